"""The KubeRay manifests: every kustomization renders, every object validates, and the Serve config
they embed is the one ``pagoda serve --config deploy/pagoda.yaml`` runs (plus the overlay's overrides).

- RayService: the ``ray.io/v1`` openAPIV3Schema of KubeRay v1.7's CRD (``../shared/k8s/crds``), made
  strict about unknown fields the way the API server's pruning is; its pod templates and the core
  objects: Kubernetes' own schemas (``kubernetes-validate``).
- ``serveConfigV2``: Serve's own schema, then the application is built from its import path and args.
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
CRDS = ROOT.parent / "shared" / "k8s" / "crds"
K8S_VERSION = "1.32"  # kubectl's; the oldest API the manifests must satisfy
KUSTOMIZATIONS = ("base", "overlays/single-gpu", "overlays/tp2", "overlays/autoscale")

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")


def _render_module():
    spec = importlib.util.spec_from_file_location("render_serve_config", K8S / "render_serve_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _render_module()


@cache
def rendered(kustomization: str) -> tuple[dict, ...]:
    out = subprocess.run(["kubectl", "kustomize", str(K8S / kustomization)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def objects(kustomization: str, kind: str) -> list[dict]:
    return [copy.deepcopy(d) for d in rendered(kustomization) if d["kind"] == kind]


def rayservice(kustomization: str) -> dict:
    (rs,) = objects(kustomization, "RayService")
    return rs


def serve_config(kustomization: str) -> dict:
    return yaml.safe_load(rayservice(kustomization)["spec"]["serveConfigV2"])


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
    path = CRDS / "ray.io_rayservices.yaml"
    if not path.is_file():
        pytest.fail(f"KubeRay CRDs not found at {path} (expected ../shared/k8s/crds next to the repository)")
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


# ------------------------------------------------------------------------- the embedded Serve config


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_manifests_cannot_drift_from_the_local_config(kustomization):
    """serveConfigV2's args are deploy/pagoda.yaml (what `pagoda serve --config` reads) with only the
    overlay's overrides applied, and the committed serve-config.yaml is what the renderer writes."""
    assert (K8S / kustomization / "serve-config.yaml").read_text() == render.render(kustomization), (
        "stale serve-config.yaml: run python deploy/k8s/render_serve_config.py")
    local = yaml.safe_load((ROOT / "deploy" / "pagoda.yaml").read_text())
    overrides_path = K8S / kustomization / "pagoda-overrides.yaml"
    overrides = yaml.safe_load(overrides_path.read_text()) if overrides_path.is_file() else {}
    (app,) = serve_config(kustomization)["applications"]
    assert app["args"] == render.merge(local, overrides)
    if kustomization == "base":
        assert app["args"] == local


def test_merge_is_deep_and_replaces_leaves():
    assert render.merge({"a": {"b": 1, "c": 2}, "d": [1]}, {"a": {"c": 3}, "d": [2]}) == {"a": {"b": 1, "c": 3}, "d": [2]}


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_serve_config_imports_and_builds_the_application(kustomization):
    pytest.importorskip("ray")
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app as build_serve_app
    from ray.serve.schema import ServeDeploySchema

    from cluster.config import AppConfig

    schema = ServeDeploySchema.model_validate(serve_config(kustomization)) if hasattr(
        ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(serve_config(kustomization))
    (app,) = schema.applications
    built = call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), app.args)
    config = AppConfig.from_dict(app.args)
    deployments = {d.name: d for d in build_serve_app(built, name=app.name).deployments}  # ingress too, if any
    deployment = deployments[f"{config.deployment.name}-engine"]
    assert app.name == config.deployment.name
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
