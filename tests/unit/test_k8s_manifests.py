"""The KubeRay manifests: every kustomization renders, every object validates, and the Serve config
they embed runs what ``pagoda serve --config deploy/pagoda.yaml`` runs — the engine behind the router
and the gRPC / OpenAI HTTP ingress — with that file's config (plus the base's ``api:`` section and the
overlay's overrides).

- RayService: the ``ray.io/v1`` openAPIV3Schema of KubeRay v1.7's CRD, made strict about unknown
  fields the way the API server's pruning is. The CRDs are not in this repository: the check reads
  them from ``$PAGODA_KUBERAY_CRDS`` (a folder with ``ray.io_rayservices.yaml``) and is skipped
  without it; ``.ci/run`` sets it and fails if the check was skipped. Pod templates and the core
  objects: Kubernetes' own schemas (``kubernetes-validate``).
- ``serveConfigV2``: Serve's own schema, then every application is built from its import path and args.
- The ingress's ports are on the head service and open in-cluster; the PodMonitor stores Ray's
  series under the vLLM-style names of ``pagoda.cluster.metrics``.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from functools import cache
from pathlib import Path

import pytest
import yaml

from pagoda.cluster.api.config import ApiConfig
from pagoda.cluster.metrics import METRICS, prometheus_series, ray_series
from tests.kustomize import K8S, KUSTOMIZATIONS, ROOT, objects, rendered, requires_kubectl
from tests.relabel import metric_relabelings, stored_name

CRDS_ENV = "PAGODA_KUBERAY_CRDS"
K8S_VERSION = "1.32"  # kubectl's; the oldest API the manifests must satisfy

pytestmark = requires_kubectl


def _render_module():
    spec = importlib.util.spec_from_file_location("render_serve_config", K8S / "render_serve_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _render_module()


def rayservice(kustomization: str) -> dict:
    (rs,) = objects(kustomization, "RayService")
    return rs


def serve_config(kustomization: str) -> dict:
    return yaml.safe_load(rayservice(kustomization)["spec"]["serveConfigV2"])


def head_container(kustomization: str) -> dict:
    return rayservice(kustomization)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _yaml(path: Path) -> dict:
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


# ---------------------------------------------------------------------------------------- schemas


def _strict(schema: dict) -> dict:
    """The structural schema with unknown fields rejected (the API server prunes them silently, which
    would hide a misspelt field) — except where the CRD preserves unknown fields."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def rayservice_validator():
    jsonschema = pytest.importorskip("jsonschema")
    folder = os.environ.get(CRDS_ENV)
    if not folder:
        pytest.skip(f"set {CRDS_ENV} to a folder holding KubeRay v1.7's CRDs (ray.io_rayservices.yaml) to run "
                    f"this check; .ci/run sets it to ../shared/k8s/crds")
    path = Path(folder) / "ray.io_rayservices.yaml"
    if not path.is_file():
        pytest.fail(f"{CRDS_ENV}={folder!r} has no ray.io_rayservices.yaml (KubeRay v1.7's CRDs)")
    crd = yaml.safe_load(path.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(v1["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def _k8s_validate(obj: dict) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    try:
        kv.validate(obj, K8S_VERSION, strict=True)
    except kv.ValidationError as exc:
        pytest.fail(f"{obj['kind']}/{obj['metadata'].get('name')}: {exc}")


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_rayservice_satisfies_the_kuberay_v1_7_crd(kustomization):
    rs = rayservice(kustomization)
    assert rs["apiVersion"] == "ray.io/v1"
    errors = sorted(rayservice_validator().iter_errors(rs), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_pod_templates_and_core_objects_satisfy_kubernetes_schemas(kustomization):
    cluster = rayservice(kustomization)["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        _k8s_validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                       "template": group["template"]})
    core = [d for d in rendered(kustomization) if d["kind"] in ("ConfigMap", "NetworkPolicy", "Service")]
    assert {d["kind"] for d in core} >= {"ConfigMap", "NetworkPolicy"}
    for obj in core:
        _k8s_validate(copy.deepcopy(obj))


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_head_is_cpu_only_and_gpu_requests_equal_limits(kustomization):
    cluster = rayservice(kustomization)["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    for container in head["template"]["spec"]["containers"]:
        for part in ("requests", "limits"):
            assert "nvidia.com/gpu" not in container.get("resources", {}).get(part, {})
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for container in group["template"]["spec"]["containers"]:
            res = container["resources"]
            assert int(res["requests"]["nvidia.com/gpu"]) >= 1
            assert res["requests"] == res["limits"]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_token_auth_on_and_dashboard_kept_inside_the_cluster(kustomization):
    cluster = rayservice(kustomization)["spec"]["rayClusterConfig"]
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    (policy,) = objects(kustomization, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"ray.io/node-type": "head"}
    assert "Ingress" in policy["spec"]["policyTypes"]
    private = {8265, 6379, 10001}  # dashboard, GCS, Ray client: only Ray pods of this namespace and the operator
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        if not ports:  # all ports: only pods of this namespace's Ray clusters
            assert all(set(peer) == {"podSelector"} for peer in rule["from"]), rule
        elif ports & private:
            assert all(peer.get("podSelector", {}).get("matchLabels") for peer in rule["from"]), rule
    (monitor,) = objects(kustomization, "PodMonitor")  # Prometheus Operator CRD: no schema offline, check its shape
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_api_ports_are_on_the_head_service_and_open_in_the_cluster(kustomization):
    """The ingress replica runs on the head (pagoda.cluster.api.ingress pins it). KubeRay's head service
    (pagoda-head-svc, ClusterIP) carries every port of the head container (ray-operator
    common/service.go, getPortsFromCluster); its serve service would not do: it selects worker pods too."""
    pytest.importorskip("ray")
    from pagoda.cluster.api.ingress import API_KEY_ENV

    (app,) = serve_config(kustomization)["applications"]
    api = ApiConfig(**app["args"]["api"])
    assert api.host == "0.0.0.0"  # the pod's interfaces, so that the service reaches the servers
    container = head_container(kustomization)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert len(set(ports.values())) == len(ports), ports  # no two servers on one port (Serve's proxy: 8000)
    assert (ports["api-http"], ports["api-grpc"]) == (api.http_port, api.grpc_port)
    (policy,) = objects(kustomization, "NetworkPolicy")
    in_cluster = {p["port"] for rule in policy["spec"]["ingress"] if rule["from"] == [{"namespaceSelector": {}}]
                  for p in rule.get("ports", [])}
    assert {api.http_port, api.grpc_port} <= in_cluster
    key = {e["name"]: e for e in container["env"]}[API_KEY_ENV]  # like `pagoda serve`: the key from the env
    assert key["valueFrom"]["secretKeyRef"]["optional"] is True  # no Secret: the API is open in-cluster


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_podmonitor_stores_rays_series_under_the_vllm_names(kustomization):
    """metricRelabelings turn each sample name cluster/metrics.py has on Ray's endpoint into its
    vLLM-style name (counters keep _total, histograms _bucket/_sum/_count); Ray's own series stay."""
    rules = metric_relabelings(kustomization)
    for spec in METRICS:
        assert tuple(stored_name(name, rules) for name in ray_series(spec)) == prometheus_series(spec)
    assert stored_name("ray_serve_num_http_requests_total", rules) == "ray_serve_num_http_requests_total"


# ------------------------------------------------------------------------- the embedded Serve config


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_manifests_cannot_drift_from_the_local_config(kustomization):
    """serveConfigV2 runs pagoda's application on deploy/pagoda.yaml (what `pagoda serve --config`
    reads) with only the base's `api:` section and the overlay's overrides applied, and the committed
    serve-config.yaml is what the renderer writes."""
    assert (K8S / kustomization / "serve-config.yaml").read_text() == render.render(kustomization), (
        "stale serve-config.yaml: run python deploy/k8s/render_serve_config.py")
    local = yaml.safe_load((ROOT / "deploy" / "pagoda.yaml").read_text())
    base = _yaml(K8S / "base" / "pagoda-overrides.yaml")
    assert set(base) == {"api"}  # the base changes only where the API servers listen
    overlay = _yaml(K8S / kustomization / "pagoda-overrides.yaml") if kustomization != "base" else {}
    (app,) = serve_config(kustomization)["applications"]
    assert app["import_path"] == "pagoda.cluster.api.ingress:build_app"  # the engine and, in front, the API servers
    assert app["args"] == render.merge(render.merge(local, base), overlay)
    if kustomization == "base":
        assert {k: v for k, v in app["args"].items() if k != "api"} == local


def test_merge_is_deep_and_replaces_leaves():
    assert render.merge({"a": {"b": 1, "c": 2}, "d": [1]}, {"a": {"c": 3}, "d": [2]}) == {"a": {"b": 1, "c": 3}, "d": [2]}


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_serve_config_imports_and_builds_every_application(kustomization):
    pytest.importorskip("ray")
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app as build_serve_app
    from ray.serve.schema import ServeDeploySchema

    from pagoda.cluster.api.ingress import HEAD_NODE_RESOURCE, INGRESS_SUFFIX
    from pagoda.cluster.app import deployment_name
    from pagoda.cluster.config import AppConfig

    schema = ServeDeploySchema.model_validate(serve_config(kustomization))
    assert schema.applications
    deployments = {}
    for app in schema.applications:  # each built from its own import path and args, as Serve does
        built = call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), app.args)
        deployments.update({d.name: d for d in build_serve_app(built, name=app.name).deployments})
    (app,) = schema.applications
    config = AppConfig.from_dict({k: v for k, v in app.args.items() if k != "api"})
    assert app.name == config.deployment.name
    ingress_name = config.deployment.name + INGRESS_SUFFIX
    assert set(deployments) == {deployment_name(config), ingress_name}  # what `pagoda serve` runs
    assert deployments[ingress_name].ray_actor_options["resources"] == {HEAD_NODE_RESOURCE: 0.001}
    deployment = deployments[deployment_name(config)]
    cluster = rayservice(kustomization)["spec"]["rayClusterConfig"]
    worker = cluster["workerGroupSpecs"][0]
    gpus_per_pod = int(worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus_per_pod >= config.engine.parallel.tensor_parallel_size  # a replica's TP ranks share one pod
    replicas = config.autoscaling.max_replicas if config.autoscaling.enabled else config.deployment.num_replicas
    pods_needed = replicas * config.engine.parallel.tensor_parallel_size // gpus_per_pod
    assert worker["maxReplicas"] >= pods_needed
    if config.autoscaling.enabled:
        assert cluster.get("enableInTreeAutoscaling") is True
        assert deployment._deployment_config.autoscaling_config.max_replicas == config.autoscaling.max_replicas
