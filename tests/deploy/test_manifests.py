"""deploy/k8s renders (kubectl's kustomize), validates against the Kubernetes schema, and keeps its promises."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes import client as k8s

from services.trainer.executor import Launch
from services.trainer.kube import MANAGED_LABELS, build_job, settings_from
from services.trainer.settings import TrainerSettings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
TARGETS = {
    "base": K8S / "base",
    "dev": K8S / "overlays" / "dev",
    "gpu": K8S / "overlays" / "gpu",
    "gpu-tls": K8S / "overlays" / "gpu-tls",
}
K8S_VERSION = kubernetes_validate.latest_version()
PROXY = "tunedock-inference-proxy"  # deploy/haproxy, a component of the gpu overlays
SERVICES = {"tunedock-registry", "tunedock-trainer", "tunedock-inference"}


def render(path: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) is needed to render deploy/k8s"
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module", params=list(TARGETS))
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(TARGETS[request.param])


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def test_every_object_validates_against_the_kubernetes_schema(rendered):
    _, objects = rendered
    assert len(objects) >= 25
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_every_container_has_probes_limits_and_runs_as_non_root(rendered):
    target, objects = rendered
    deployments = by_kind(objects, "Deployment")
    assert set(deployments) == (SERVICES | {PROXY} if target.startswith("gpu") else SERVICES)
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0, name
        for container in pod["containers"]:
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                if name == PROXY:  # HAProxy's own HTTP monitor on its admin port
                    assert container[probe]["httpGet"] == {"path": "/healthz", "port": "admin"}
                elif target == "gpu-tls":  # native gRPC probes cannot speak TLS: the health check client does
                    assert container[probe]["exec"]["command"] == ["python", "-m", "tunedock.healthcheck"]
                    assert "grpc" not in container[probe]
                else:
                    assert "grpc" in container[probe], (name, probe)  # native gRPC health probes
                    port = container[probe]["grpc"]["port"]
                    assert port in [p["containerPort"] for p in container["ports"]]
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
            assert security["readOnlyRootFilesystem"] is True
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) in [p["containerPort"] for p in pod["containers"][0]["ports"]]
        # Each service has its own identity, config, disruption budget and policy.
        assert pod["serviceAccountName"] in by_kind(objects, "ServiceAccount")
        assert name in by_kind(objects, "ConfigMap") or any(
            n.startswith(name + "-") for n in by_kind(objects, "ConfigMap")
        )
        assert name in by_kind(objects, "PodDisruptionBudget") and name in by_kind(objects, "NetworkPolicy")


def test_every_service_authenticates_with_tokens_from_a_secret(rendered):
    target, objects = rendered
    for name, deployment in by_kind(objects, "Deployment").items():
        if name == PROXY:  # holds no credentials: it forwards each caller's own bearer token
            assert "auth" not in {v["name"] for v in deployment["spec"]["template"]["spec"]["volumes"]}
            continue
        pod = deployment["spec"]["template"]["spec"]
        (auth,) = [v for v in pod["volumes"] if v["name"] == "auth"]
        assert auth["secret"]["secretName"] == "tunedock-auth"
        items = {i["path"] for i in auth["secret"]["items"]}
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "auth"]
        assert mount["readOnly"] is True
        env = config(objects, name)
        files = {k: v for k, v in env.items() if k.endswith(("TOKEN_FILE", "KEY_FILE")) and "TLS" not in k}
        assert f"TUNEDOCK_{name.removeprefix('tunedock-').upper()}_TOKEN_FILE" in files, name
        for key, path in files.items():
            directory, _, filename = path.rpartition("/")
            assert directory == mount["mountPath"] and filename in items, (name, key)
        if target == "gpu-tls":
            assert env[f"TUNEDOCK_{name.removeprefix('tunedock-').upper()}_TLS_CLIENT_CA_FILE"]
            assert any(v["name"] == "tls" and v["secret"]["secretName"] == "tunedock-tls" for v in pod["volumes"])


def test_rbac_grants_jobs_and_pod_reads_in_the_namespace_only(rendered):
    _, objects = rendered
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")
    (role,) = by_kind(objects, "Role").values()
    allowed = {
        ("batch", "jobs"): {"create", "get", "list", "watch", "delete"},
        ("", "pods"): {"get", "list", "watch"},
        ("", "secrets"): {"create", "patch", "delete"},  # workers' token Secrets: written, never read back
    }
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert set(rule["verbs"]) <= allowed[(group, resource)], rule
    (binding,) = by_kind(objects, "RoleBinding").values()
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tunedock-trainer", **_ns(binding)}]
    # Only the trainer mounts an API token.
    for name, deployment in by_kind(objects, "Deployment").items():
        mounts_token = deployment["spec"]["template"]["spec"]["automountServiceAccountToken"]
        assert mounts_token is (name == "tunedock-trainer"), name


def _ns(obj: dict) -> dict:
    return {"namespace": obj["metadata"]["namespace"]} if "namespace" in obj["metadata"] else {}


def test_network_policies_admit_only_workers_to_the_worker_api(rendered):
    _, objects = rendered
    policies = by_kind(objects, "NetworkPolicy")
    trainer_rules = policies["tunedock-trainer"]["spec"]["ingress"]
    worker_api = [r for r in trainer_rules if any(p["port"] == 50054 for p in r["ports"])]
    assert worker_api == [
        {
            "from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/component": "worker"}}}],
            "ports": [{"port": 50054, "protocol": "TCP"}],
        }
    ]
    registry_from = [
        peer["podSelector"]["matchLabels"]
        for rule in policies["tunedock-registry"]["spec"]["ingress"]
        for peer in rule["from"]
        if "podSelector" in peer
    ]
    assert {"app.kubernetes.io/name": "tunedock-inference"} in registry_from
    assert {"app.kubernetes.io/name": "tunedock-trainer"} in registry_from
    # The trainer's worker API is a Service of its own, on the port the policy guards.
    worker_service = by_kind(objects, "Service")["tunedock-trainer-worker"]
    assert [p["port"] for p in worker_service["spec"]["ports"]] == [50054]


def test_inference_is_behind_a_headless_service(rendered):
    _, objects = rendered
    services = by_kind(objects, "Service")
    assert services["tunedock-inference"]["spec"]["clusterIP"] == "None"
    assert services["tunedock-registry"]["spec"]["clusterIP"] == "None"
    configs = {n.rsplit("-", 1)[0] if n.count("-") > 1 else n: c for n, c in by_kind(objects, "ConfigMap").items()}
    registry_targets = [c["data"][k] for c in configs.values() for k in c["data"] if k.endswith("REGISTRY_ADDRESS")]
    assert registry_targets and all(t == "dns:///tunedock-registry:50052" for t in registry_targets)


@pytest.mark.parametrize("overlay", ["gpu", "gpu-tls"])
def test_the_affinity_proxy_fronts_the_replicas_with_the_repos_haproxy_config(overlay):
    objects = render(TARGETS[overlay])
    proxy = by_kind(objects, "Deployment")[PROXY]["spec"]["template"]["spec"]
    (container,) = proxy["containers"]
    (generated,) = [c for n, c in by_kind(objects, "ConfigMap").items() if n.startswith(PROXY + "-")]
    # The config the tests run (tests/inference/test_routing.py) is the config the cluster runs.
    assert generated["data"]["haproxy.cfg"] == (ROOT / "deploy" / "haproxy" / "haproxy.cfg").read_text()
    data = generated["data"]
    assert data["TUNEDOCK_PROXY_BIND"] == "*:50053" and data["TUNEDOCK_PROXY_ADMIN"] == "*:8404"
    assert data["TUNEDOCK_PROXY_HTTP_BIND"] == "*:8000"
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "config"]
    assert container["command"][-1] == mount["mountPath"] + "/haproxy.cfg"
    # Replicas come from the headless Service's SRV records for its port named grpc.
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TUNEDOCK_INFERENCE_SRV"] == "_grpc._tcp.tunedock-inference.$(POD_NAMESPACE).svc.cluster.local"
    # ... and for its port named http: the OpenAI API, routed on the body's model.
    assert env["TUNEDOCK_INFERENCE_HTTP_SRV"] == "_http._tcp.tunedock-inference.$(POD_NAMESPACE).svc.cluster.local"
    inference_service = by_kind(objects, "Service")["tunedock-inference"]["spec"]
    assert inference_service["clusterIP"] == "None"
    assert {p["name"]: p["port"] for p in inference_service["ports"]}.items() >= {"grpc": 50053, "http": 8000}.items()
    inference = config(objects, "tunedock-inference")
    assert inference["TUNEDOCK_INFERENCE_HTTP_PORT"] == "8000"
    # Base requests spread by load: the proxy knows the base's id from the replicas' own config.
    (base_id,) = [e for e in container["env"] if e["name"] == "TUNEDOCK_BASE_MODEL_ID"]
    ref = base_id["valueFrom"]["configMapKeyRef"]
    assert ref["key"] == "TUNEDOCK_INFERENCE_BASE_MODEL" and inference[ref["key"]]
    assert by_kind(objects, "ConfigMap")[ref["name"]]["data"] == inference
    assert [p["port"] for p in by_kind(objects, "Service")[PROXY]["spec"]["ports"]] == [50053, 8000, 8404]
    # The replicas admit the proxy; the proxy admits clients and monitoring only.
    policies = by_kind(objects, "NetworkPolicy")
    replica_rule = policies["tunedock-inference"]["spec"]["ingress"][0]
    replica_peers = [p["podSelector"]["matchLabels"] for p in replica_rule["from"]]
    assert {"app.kubernetes.io/name": PROXY} in replica_peers
    assert [[p["port"] for p in r["ports"]] for r in policies[PROXY]["spec"]["ingress"]] == [[50053, 8000], [8404]]
    assert [p["port"] for p in replica_rule["ports"]] == [50053, 8000]
    assert PROXY in by_kind(objects, "PodDisruptionBudget") and proxy["automountServiceAccountToken"] is False
    if overlay == "gpu-tls":
        assert by_kind(objects, "ConfigMap")[generated["metadata"]["name"]]["data"]["TUNEDOCK_PROXY_TLS_DIR"]
        (tls,) = [v for v in proxy["volumes"] if v["name"] == "tls"]
        paths = {i["key"]: i["path"] for i in tls["secret"]["items"]}
        assert paths == {"tls.crt": "tls.pem", "tls.key": "tls.pem.key", "ca.crt": "ca.crt"}
        assert proxy["securityContext"]["fsGroup"] == proxy["securityContext"]["runAsGroup"]
    else:
        assert "TUNEDOCK_PROXY_TLS_DIR" not in generated["data"]


def config(objects: list[dict], prefix: str) -> dict[str, str]:
    (cm,) = [
        o
        for o in objects  # the name, or the name and a generator's hash suffix
        if o["kind"] == "ConfigMap" and re.fullmatch(re.escape(prefix) + r"(-[a-z0-9]{10})?", o["metadata"]["name"])
    ]
    return cm["data"]


def test_dev_overlay_is_cpu_sqlite_single_replicas():
    objects = render(TARGETS["dev"])
    deployments = by_kind(objects, "Deployment")
    assert all(d["spec"]["replicas"] == 1 for d in deployments.values())
    assert {"tunedock-registry-data", "tunedock-trainer-data"} <= set(by_kind(objects, "PersistentVolumeClaim"))
    for d in deployments.values():
        for c in d["spec"]["template"]["spec"]["containers"]:
            assert c["image"].endswith("-cpu") and "nvidia.com/gpu" not in c["resources"]["limits"]
            assert not any(e["name"].endswith("DATABASE_URL") for e in c.get("env", []))  # SQLite on the PVC
    assert config(objects, "tunedock-trainer")["TUNEDOCK_TRAINER_EXECUTOR"] == "local"
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {"tunedock-dev"}


@pytest.mark.parametrize("overlay", ["dev", "gpu"])
def test_jobs_without_a_base_train_on_the_base_inference_serves(overlay):
    objects = render(TARGETS[overlay])
    trainer, inference = config(objects, "tunedock-trainer"), config(objects, "tunedock-inference")
    # Both empty means both use the embedded tiny model.
    assert trainer.get("TUNEDOCK_TRAINER_DEFAULT_BASE_MODEL", "") == inference.get("TUNEDOCK_INFERENCE_BASE_MODEL", "")


def test_gpu_overlay_puts_inference_on_gpus_and_state_in_postgres_and_s3():
    objects = render(TARGETS["gpu"])
    deployments = by_kind(objects, "Deployment")
    inference = deployments["tunedock-inference"]
    assert inference["spec"]["replicas"] >= 2
    (container,) = inference["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1" and container["image"].endswith("-cuda")
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in inference["spec"]["template"][
        "spec"
    ]["tolerations"]
    (hpa,) = by_kind(objects, "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"]["name"] == "tunedock-inference" and hpa["spec"]["minReplicas"] >= 2
    registry_env = {
        e["name"]: e["valueFrom"]["secretKeyRef"]["name"]
        for e in deployments["tunedock-registry"]["spec"]["template"]["spec"]["containers"][0]["env"]
        if "valueFrom" in e
    }
    assert registry_env["TUNEDOCK_REGISTRY_DATABASE_URL"] == "tunedock-postgres"
    assert registry_env["TUNEDOCK_REGISTRY_BLOB_URL"] == "tunedock-s3"
    assert "tunedock-registry-data" not in by_kind(objects, "PersistentVolumeClaim")
    trainer_data = by_kind(objects, "PersistentVolumeClaim")["tunedock-trainer-data"]
    assert trainer_data["spec"]["accessModes"] == ["ReadWriteMany"]  # shared with worker pods on other nodes


@pytest.mark.parametrize("overlay", ["dev", "gpu", "gpu-tls"])
def test_worker_jobs_from_the_overlays_trainer_settings_fit_the_manifests(overlay, monkeypatch):
    """The Job the trainer would create with the overlay's settings: valid, same image, wired to the manifests."""
    objects = render(TARGETS[overlay])
    for key, value in config(objects, "tunedock-trainer").items():  # what envFrom gives the trainer pod
        if not key.endswith("_FILE"):  # mounted from Secrets in the pod; not on this machine
            monkeypatch.setenv(key, value)
    settings = TrainerSettings.load([], executor="kubernetes", insecure=True)
    job = build_job("job-0123456789ab", 1, Launch(method="qlora", processes_per_node=2), settings_from(settings))
    body = k8s.ApiClient().sanitize_for_serialization(job)
    kubernetes_validate.validate(body, K8S_VERSION, strict=True)
    trainer = by_kind(objects, "Deployment")["tunedock-trainer"]["spec"]["template"]["spec"]["containers"][0]
    pod = body["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == trainer["image"]
    assert pod["serviceAccountName"] in by_kind(objects, "ServiceAccount")
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "tunedock-trainer-data"}} in pod["volumes"]
    host, port = settings.k8s_worker_trainer_address.split(":")
    service = by_kind(objects, "Service")[host]
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    labels = body["spec"]["template"]["metadata"]["labels"]
    assert MANAGED_LABELS.items() <= labels.items()
    workers = by_kind(objects, "Service")["tunedock-workers"]["spec"]["selector"]
    assert workers.items() <= labels.items()
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    if overlay == "gpu-tls":  # workers present the services' client certificate under mTLS
        assert {"name": "tls", "secret": {"secretName": "tunedock-tls", "defaultMode": 0o400}} in pod["volumes"]
        assert env["TUNEDOCK_TLS_CERT_FILE"] == "/etc/tunedock/tls/tls.crt"
    else:
        assert "TUNEDOCK_TLS_CA_FILE" not in env
