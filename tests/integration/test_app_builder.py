"""The application as KubeRay builds it: `import_path: pagoda.cluster.app:build_app` with the YAML as args.

No cluster is started: building a Serve application and its deployment options is local.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")
from ray import serve
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

from pagoda.cluster.app import build_app, deployment_options
from pagoda.cluster.config import AppConfig
from pagoda.cluster.replica import LLMReplica
from pagoda.cluster.router import PagodaRouter

ROOT = Path(__file__).resolve().parents[2]


def test_serve_accepts_the_builder_with_the_shipped_yaml():
    args = yaml.safe_load((ROOT / "deploy" / "pagoda.yaml").read_text())
    app = call_user_app_builder_with_args_if_necessary(build_app, args)
    deployment = app._bound_deployment
    assert deployment.name == "pagoda-engine"
    assert deployment.num_replicas == 2
    router = deployment._deployment_config.request_router_config
    assert router.get_request_router_class() is PagodaRouter
    assert router.request_router_kwargs["weights"]["prefix"] == args["router"]["weights"]["prefix"]
    assert router.request_routing_stats_period_s == args["router"]["stats_period_s"]


def test_a_bad_field_fails_the_build_naming_it():
    with pytest.raises(ValueError, match=r"router\.weights\.kv must be >= 0"):
        build_app({"router": {"weights": {"kv": -1}}})


def test_autoscaling_replaces_the_fixed_replica_count():
    options = deployment_options(AppConfig.from_dict({
        "deployment": {"num_replicas": 2},
        "autoscaling": {"enabled": True, "min_replicas": 1, "max_replicas": 6, "target_ongoing_requests": 16},
    }))
    assert "num_replicas" not in options
    scaling = options["autoscaling_config"]
    assert (scaling.min_replicas, scaling.initial_replicas, scaling.max_replicas) == (1, 2, 6)
    assert scaling.target_ongoing_requests == 16


def test_pow2_policy_uses_serves_default_router():
    options = deployment_options(AppConfig.from_dict({"router": {"policy": "pow2"}}))
    assert options["request_router_config"].get_request_router_class() is not PagodaRouter


REPLICA_ENV = {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}}  # user code on the replica's loop


def test_replica_resources_follow_the_device_and_tensor_parallelism():
    gpu_tp1 = deployment_options(AppConfig.from_dict({"engine": {"device": "cuda"}}))
    assert gpu_tp1["ray_actor_options"]["num_gpus"] == 1
    assert gpu_tp1["ray_actor_options"]["runtime_env"] == REPLICA_ENV
    assert "placement_group_bundles" not in gpu_tp1
    cpu = deployment_options(AppConfig.from_dict({"engine": {"device": "cpu"}}))
    assert cpu["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0, "runtime_env": REPLICA_ENV}


def test_tp_replicas_reserve_a_bundle_per_rank_actor():
    """TP > 1 defaults to the Ray executor: the replica takes bundle 0 (no GPU), rank i bundle i + 1."""
    gpu_tp2 = AppConfig.from_dict({"engine": {"device": "cuda", "tensor_parallel_size": 2},
                                   "deployment": {"cpus_per_replica": 2}})
    assert gpu_tp2.engine.parallel.distributed_executor_backend == "ray"
    options = deployment_options(gpu_tp2)
    assert options["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0, "runtime_env": REPLICA_ENV}
    assert options["placement_group_bundles"] == [{"CPU": 2.0}, {"GPU": 1.0}, {"GPU": 1.0}]
    assert options["placement_group_strategy"] == "STRICT_PACK"
    cpu_tp2 = deployment_options(AppConfig.from_dict({"engine": {"device": "cpu", "tensor_parallel_size": 2}}))
    assert cpu_tp2["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0, "runtime_env": REPLICA_ENV}
    assert cpu_tp2["placement_group_bundles"] == [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}]
    # Serve accepts the options (it checks that the replica fits bundle 0).
    serve.deployment(LLMReplica).options(**options).bind({})


def test_mp_backend_keeps_the_ranks_inside_one_replica_actor():
    engine = {"device": "cuda", "tensor_parallel_size": 2, "distributed_executor_backend": "mp"}
    gpu_tp2 = deployment_options(AppConfig.from_dict({"engine": engine, "deployment": {"cpus_per_replica": 2}}))
    # the ranks are processes of the replica
    assert gpu_tp2["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 2, "runtime_env": REPLICA_ENV}
    assert "placement_group_bundles" not in gpu_tp2
    cpu_tp2 = deployment_options(AppConfig.from_dict({"engine": {**engine, "device": "cpu"}}))
    assert cpu_tp2["ray_actor_options"] == {"num_cpus": 3.0, "num_gpus": 0, "runtime_env": REPLICA_ENV}


def test_the_deploying_environment_may_put_user_code_back_on_its_own_thread(monkeypatch):
    monkeypatch.setenv("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "1")
    options = deployment_options(AppConfig.from_dict({"engine": {"device": "cpu"}}))
    env_vars = options["ray_actor_options"]["runtime_env"]["env_vars"]
    assert env_vars == {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1"}


def test_a_bad_executor_backend_is_named():
    with pytest.raises(ValueError, match=r"^engine\.distributed_executor_backend must be one of \('mp', 'ray'\)"):
        AppConfig.from_dict({"engine": {"distributed_executor_backend": "slurm"}})
