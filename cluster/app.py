"""The Serve application: ``LLMReplica`` × N behind ``PagodaRouter``, built from an ``AppConfig``.

Two ways in, one config format:

- ``pagoda serve --config pagoda.yaml`` (``pagoda.cluster.serve_cli``) calls ``deploy(config)``;
- ``build_app(args)`` builds it from the YAML config as a Serve application builder; the API
  ingress (``pagoda.cluster.api.ingress:build_app``, which is what KubeRay's ``serveConfigV2`` names)
  builds this application behind its gRPC and HTTP doors from the same ``args``::

      applications:
        - name: pagoda
          import_path: pagoda.cluster.api.ingress:build_app
          args: { engine: {...}, deployment: {...}, router: {...}, autoscaling: {...}, api: {...} }

Tensor parallelism: a replica with ``tensor_parallel_size = k > 1`` reserves a STRICT_PACK
placement group (``pagoda.cluster.placement``): bundle 0 holds the replica — the engine, CPUs only — and
bundles 1..k one GPU (one CPU on CPU) each, where the engine's ``RayExecutor`` starts its k rank
actors. With ``distributed_executor_backend: mp`` the replica is instead one actor holding k GPUs
and the ``MultiprocExecutor`` spawns the ranks as processes inside it. TP = 1 replicas hold their
one GPU themselves.
"""

from __future__ import annotations

import os

from ray import serve
from ray.serve.config import AutoscalingConfig as ServeAutoscalingConfig
from ray.serve.config import AutoscalingPolicy, RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from pagoda.cluster.autoscaling import KVAwarePolicy
from pagoda.cluster.config import AppConfig
from pagoda.cluster.placement import STRATEGY, replica_bundles
from pagoda.cluster.replica import LLMReplica
from pagoda.cluster.router import PagodaRouter

DEPLOYMENT_SUFFIX = "-engine"


def build_app(args: dict | None = None):
    """Serve application builder (``import_path: pagoda.cluster.app:build_app``); ``args`` is the YAML config."""
    return application(AppConfig.from_dict(args))


def application(config: AppConfig, router_class: type = PagodaRouter):
    """The bound application; ``router_class`` may be a subclass of PagodaRouter (``policy: pagoda``)."""
    options = deployment_options(config, router_class)
    return serve.deployment(LLMReplica).options(**options).bind(config.to_dict())


def deploy(config: AppConfig, router_class: type = PagodaRouter) -> DeploymentHandle:
    """Run the application on the connected Ray cluster; returns its handle once every replica is up."""
    return serve.run(application(config, router_class), name=config.deployment.name, route_prefix=None)


def deployment_name(config: AppConfig) -> str:
    return config.deployment.name + DEPLOYMENT_SUFFIX


def deployment_options(config: AppConfig, router_class: type = PagodaRouter) -> dict:
    """``Deployment.options`` for the engine replicas: count or autoscaling, resources, router."""
    d = config.deployment
    options = {
        "name": deployment_name(config),
        "max_ongoing_requests": config.max_ongoing_requests,  # running + the engine's queue, per replica
        "health_check_period_s": d.health_check_period_s,
        "health_check_timeout_s": d.health_check_timeout_s,
        "graceful_shutdown_timeout_s": d.graceful_shutdown_timeout_s,
        "request_router_config": request_router_config(config, router_class),
        **replica_resources(config),
    }
    scaling = config.autoscaling
    if scaling.enabled:
        options["autoscaling_config"] = ServeAutoscalingConfig(
            min_replicas=scaling.min_replicas,
            max_replicas=scaling.max_replicas,
            initial_replicas=d.num_replicas,
            target_ongoing_requests=scaling.target_ongoing_requests,
            upscale_delay_s=scaling.upscale_delay_s,
            downscale_delay_s=scaling.downscale_delay_s,
            metrics_interval_s=scaling.metrics_interval_s,
            look_back_period_s=scaling.look_back_period_s,
            policy=AutoscalingPolicy(policy_function=KVAwarePolicy,  # requests and KV usage (cluster/autoscaling.py)
                                     policy_kwargs={"target_kv_usage": scaling.target_kv_usage}),
        )
    else:
        options["num_replicas"] = d.num_replicas
    return options


def request_router_config(config: AppConfig, router_class: type = PagodaRouter) -> RequestRouterConfig:
    """PagodaRouter with the config's weights and engine limits, or Serve's default (``policy: pow2``)."""
    router = config.router
    if router.policy == "pow2":
        return RequestRouterConfig(request_routing_stats_period_s=router.stats_period_s)
    engine = config.engine
    return RequestRouterConfig(
        request_router_class=router_class,
        request_router_kwargs={
            "weights": {k: getattr(router.weights, k) for k in router.weights.__dataclass_fields__},
            "max_num_seqs": engine.scheduler.max_num_seqs,
            "max_num_batched_tokens": engine.scheduler.max_num_batched_tokens,
            "block_size": engine.cache.block_size,
        },
        request_routing_stats_period_s=router.stats_period_s,
        request_routing_stats_timeout_s=max(10.0, 5 * router.stats_period_s),
    )


# Serve runs a replica's user code on its own event loop thread by default, so every streamed item
# crosses threads twice (user loop -> replica loop -> Ray). The replica's engine already runs on its
# own thread, and nothing in LLMReplica blocks its loop, so pagoda runs user code on the replica's
# loop: a stream that falls behind then coalesces what queued (AsyncLLMEngine) instead of Serve
# sending every step's delta as its own item. With the rest of issue #15's changes it took 256
# streams of the Llama-3.1-8B shape on an H100 from 2,556 to 13,526 tok/s over HTTP
# (bench/results/serving_llama-3.1-8b.*; its own share was not isolated). The deploying process's
# environment may set it back to "1".
USER_CODE_THREAD_ENV = "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"


def replica_env() -> dict[str, str]:
    return {USER_CODE_THREAD_ENV: os.environ.get(USER_CODE_THREAD_ENV, "0")}


def replica_resources(config: AppConfig) -> dict:
    """Ray resources of one replica. TP = 1: CPUs and the GPU for the engine. TP > 1 with the Ray
    backend: the replica takes bundle 0 (CPUs only) of a STRICT_PACK group whose bundles 1..k are the
    rank actors'. TP > 1 with "mp": one actor holding every GPU (on CPU, a CPU per extra rank process);
    Ray's CUDA_VISIBLE_DEVICES for the actor is inherited by the rank processes."""
    cpus = config.deployment.cpus_per_replica
    parallel = config.engine.parallel
    tp, gpu = parallel.tensor_parallel_size, _uses_gpus(config)
    runtime_env = {"env_vars": replica_env()}
    if tp > 1 and parallel.distributed_executor_backend == "ray":
        return {
            "ray_actor_options": {"num_cpus": cpus, "num_gpus": 0, "runtime_env": runtime_env},
            "placement_group_bundles": replica_bundles(tp, gpu, cpus),
            "placement_group_strategy": STRATEGY,
        }
    if gpu:
        return {"ray_actor_options": {"num_cpus": cpus, "num_gpus": tp, "runtime_env": runtime_env}}
    return {"ray_actor_options": {"num_cpus": cpus + (tp if tp > 1 else 0), "num_gpus": 0, "runtime_env": runtime_env}}


def _uses_gpus(config: AppConfig) -> bool:
    device = config.engine.model.device
    if device != "auto":
        return device == "cuda"
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
