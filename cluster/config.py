"""The application config: one YAML file that `pagoda serve --config` reads and the KubeRay
manifests embed (as the Serve application's ``args``), so the same text runs on a laptop and in a
cluster.

    engine:        # EngineConfig fields, flat, vLLM names (model, dtype, max_num_seqs, tensor_parallel_size, ...);
                   # with tensor_parallel_size > 1, distributed_executor_backend defaults to "ray" here;
                   # images (MultiModalConfig): limit_images_per_prompt, image_resize_max_pixels, allow_image_urls, ...
    deployment:    # the Ray Serve deployment: name, num_replicas, max_ongoing_requests, resources, health
                   # (health_check_period_s / _timeout_s; stall_timeout_s: no engine progress -> replaced)
    router:        # the KV-occupancy router: policy, weights, how often replicas publish stats
    autoscaling:   # Serve autoscaling (off unless enabled)

Every section and field is optional; an unknown key, a wrong type or a bad value is a ValueError
naming the field by its path (``router.weights.prefix must be >= 0, got -1``). Everything is
frozen once built, like ``pagoda.engine.config``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pagoda.engine.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    MultiModalConfig,
    ParallelConfig,
    SchedulerConfig,
    require,
)

_ENGINE_GROUPS = (ModelConfig, CacheConfig, SchedulerConfig, ParallelConfig, MultiModalConfig)
_POLICIES = ("pagoda", "pow2")
# Engine queue a replica accepts when engine.max_waiting is unset: a queued request costs host memory for
# its token ids only, and the client's deadline bounds its wait (vLLM's queue has no limit at all).
DEFAULT_REPLICA_QUEUE = 4096


@dataclass(frozen=True)
class DeploymentOptions:
    """How Ray Serve runs the replicas; each replica hosts one engine."""

    name: str = "pagoda"  # Serve application name (the deployment is `<name>-engine`)
    num_replicas: int = 1  # fixed replica count; the initial count when autoscaling is on
    # Requests one replica holds: running plus queued in its engine, where priority and deadlines apply.
    # None: what the engine runs and queues, max_num_seqs + max_waiting (max_waiting unset counts as
    # DEFAULT_REPLICA_QUEUE). A full replica takes no more; the router tries the others.
    max_ongoing_requests: int | None = None
    cpus_per_replica: float = 1.0  # Ray CPUs per replica; on CPU also the engine's torch threads
    health_check_period_s: float = 5.0  # Serve calls the replica's check_health this often
    health_check_timeout_s: float = 30.0  # a check_health that has not answered by then counts as failed
    # A replica whose engine has requests but completes no step for this long fails check_health and Serve
    # replaces it (a hung device, a stuck collective). It measures progress, not latency: a long prompt
    # is many chunked-prefill steps, each completing; without chunked prefill one step must fit in it.
    stall_timeout_s: float = 60.0
    graceful_shutdown_timeout_s: float = 10.0  # in-flight requests get this long when a replica stops
    # Where a replica's engine runs (pagoda.engine.engine_core): "process", a process of its own, so that
    # streaming never delays a step (the served path keeps the engine's speed); "thread", a thread of the
    # replica (starts faster; Ray TP ranks need it); "auto": process, except thread with the Ray executor.
    engine_core: Literal["auto", "thread", "process"] = "auto"

    def __post_init__(self) -> None:
        require(bool(self.name) and self.name.replace("-", "").replace("_", "").isalnum(),
                 f"name must be letters, digits, '-' or '_', got {self.name!r}")
        require(self.num_replicas >= 1, f"num_replicas must be >= 1, got {self.num_replicas}")
        require(self.max_ongoing_requests is None or self.max_ongoing_requests >= 1,
                 f"max_ongoing_requests must be >= 1, got {self.max_ongoing_requests}")
        require(self.cpus_per_replica > 0, f"cpus_per_replica must be > 0, got {self.cpus_per_replica}")
        require(self.health_check_period_s > 0, f"health_check_period_s must be > 0, got {self.health_check_period_s}")
        require(self.health_check_timeout_s > 0,
                 f"health_check_timeout_s must be > 0, got {self.health_check_timeout_s}")
        require(self.stall_timeout_s > 0, f"stall_timeout_s must be > 0, got {self.stall_timeout_s}")
        require(self.graceful_shutdown_timeout_s >= 0,
                 f"graceful_shutdown_timeout_s must be >= 0, got {self.graceful_shutdown_timeout_s}")


@dataclass(frozen=True)
class RouterWeights:
    """Weights of ``pagoda.cluster.routing_policy.score``; each term is dimensionless (see there)."""

    queue: float = 1.0  # running + waiting requests, per max_num_seqs
    backlog: float = 1.0  # prefill tokens ahead of the request's first token, per max_num_batched_tokens
    kv: float = 1.0  # KV occupancy after admitting the request, in [0, 1] (not for priority < 0)
    overflow: float = 8.0  # extra, per unit of KV demand beyond capacity (waiting or preemption)
    prefix: float = 0.5  # bonus for the fraction of the prompt already cached on the replica (not for priority < 0)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            require(value >= 0, f"{f.name} must be >= 0, got {value}")


@dataclass(frozen=True)
class RouterConfig:
    """The request router of the deployment."""

    policy: Literal["pagoda", "pow2"] = "pagoda"  # pow2: Ray Serve's default power-of-two-choices
    weights: RouterWeights = field(default_factory=RouterWeights)
    stats_period_s: float = 1.0  # how often each replica publishes its routing stats
    prefix_summary_blocks: int = 4096  # block hashes a replica publishes (most recently used first)

    def __post_init__(self) -> None:
        require(self.policy in _POLICIES, f"policy must be one of {_POLICIES}, got {self.policy!r}")
        require(self.stats_period_s > 0, f"stats_period_s must be > 0, got {self.stats_period_s}")
        require(self.prefix_summary_blocks >= 0,
                 f"prefix_summary_blocks must be >= 0, got {self.prefix_summary_blocks}")


@dataclass(frozen=True)
class AutoscalingConfig:
    """Serve autoscaling on ongoing requests and KV occupancy per replica (used when ``enabled``;
    the policy is ``pagoda.cluster.autoscaling.KVAwarePolicy``)."""

    enabled: bool = False
    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float = 32.0  # per replica
    target_kv_usage: float = 0.8  # mean KV occupancy per replica above which replicas are added, in (0, 1]
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    metrics_interval_s: float = 10.0  # how often replicas and handles report load to the controller
    look_back_period_s: float = 30.0  # the window the reports are averaged over

    def __post_init__(self) -> None:
        require(self.min_replicas >= 0, f"min_replicas must be >= 0, got {self.min_replicas}")
        require(self.max_replicas >= max(1, self.min_replicas),
                 f"max_replicas must be >= max(1, min_replicas={self.min_replicas}), got {self.max_replicas}")
        require(self.target_ongoing_requests > 0,
                 f"target_ongoing_requests must be > 0, got {self.target_ongoing_requests}")
        require(0 < self.target_kv_usage <= 1, f"target_kv_usage must be in (0, 1], got {self.target_kv_usage}")
        require(self.metrics_interval_s > 0, f"metrics_interval_s must be > 0, got {self.metrics_interval_s}")
        require(self.look_back_period_s > 0, f"look_back_period_s must be > 0, got {self.look_back_period_s}")
        require(self.upscale_delay_s >= 0, f"upscale_delay_s must be >= 0, got {self.upscale_delay_s}")
        require(self.downscale_delay_s >= 0, f"downscale_delay_s must be >= 0, got {self.downscale_delay_s}")


@dataclass(frozen=True)
class AppConfig:
    """The whole application: one engine per replica, the deployment, its router, autoscaling."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    deployment: DeploymentOptions = field(default_factory=DeploymentOptions)
    router: RouterConfig = field(default_factory=RouterConfig)
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)

    @property
    def max_ongoing_requests(self) -> int:
        """Requests one replica accepts (Serve's ``max_ongoing_requests``): the deployment's setting, else
        what its engine runs plus what it queues."""
        if self.deployment.max_ongoing_requests is not None:
            return self.deployment.max_ongoing_requests
        sched = self.engine.scheduler
        queue = sched.max_waiting if sched.max_waiting is not None else DEFAULT_REPLICA_QUEUE
        return sched.max_num_seqs + queue

    @property
    def engine_core(self) -> str:
        """Where each replica runs its engine: ``deployment.engine_core`` with "auto" resolved."""
        if self.deployment.engine_core != "auto":
            return self.deployment.engine_core
        return "thread" if _ray_ranks(self.engine) else "process"

    @property
    def max_replicas(self) -> int:
        """Replicas there can be: the fixed count, or autoscaling's maximum."""
        return self.autoscaling.max_replicas if self.autoscaling.enabled else self.deployment.num_replicas

    def __post_init__(self) -> None:
        require(not (self.deployment.engine_core == "process" and _ray_ranks(self.engine)),
                "deployment.engine_core must be 'thread' or 'auto' with engine.distributed_executor_backend "
                "'ray' (its TP ranks are placed from the replica's own Ray worker), got 'process'")
        scaling, replicas = self.autoscaling, self.deployment.num_replicas
        if scaling.enabled:
            require(scaling.min_replicas <= replicas <= scaling.max_replicas,
                     f"deployment.num_replicas ({replicas}) must be within autoscaling "
                     f"[min_replicas={scaling.min_replicas}, max_replicas={scaling.max_replicas}]")

    @classmethod
    def from_dict(cls, data: dict | None) -> AppConfig:
        """Build from the parsed YAML; raises ValueError naming the first bad field by its path."""
        data = {} if data is None else data
        require(isinstance(data, dict), f"config must be a mapping of sections, got {type(data).__name__}")
        _check_keys(data, ("engine", "deployment", "router", "autoscaling"), "")
        return cls(
            engine=_engine_from_dict(data.get("engine") or {}),
            deployment=_build(DeploymentOptions, data.get("deployment") or {}, "deployment"),
            router=_build(RouterConfig, data.get("router") or {}, "router"),
            autoscaling=_build(AutoscalingConfig, data.get("autoscaling") or {}, "autoscaling"),
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> AppConfig:
        return cls.from_dict(read_yaml(path))

    def to_dict(self) -> dict:
        """The YAML form (engine fields flat): ``AppConfig.from_dict(c.to_dict()) == c``."""
        engine: dict = {}
        for group in dataclasses.fields(self.engine):  # model, cache, scheduler, parallel, multimodal
            engine.update(dataclasses.asdict(getattr(self.engine, group.name)))
        return {
            "engine": engine,
            "deployment": dataclasses.asdict(self.deployment),
            "router": dataclasses.asdict(self.router),
            "autoscaling": dataclasses.asdict(self.autoscaling),
        }


def _ray_ranks(engine: EngineConfig) -> bool:
    parallel = engine.parallel
    return parallel.tensor_parallel_size > 1 and parallel.distributed_executor_backend == "ray"


def load_config(path: str | Path | None) -> AppConfig:
    """The config at ``path``, or the defaults (embedded model, one replica) when None."""
    return AppConfig() if path is None else AppConfig.from_yaml(path)


# ---------------------------------------------------------------------------------------- parsing


def read_yaml(path: str | Path) -> Any:
    """The parsed file; ValueError when it is missing or not YAML."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {str(path)!r} is not valid YAML: {exc}") from None


def _check_keys(data: dict, known, path: str) -> None:
    for key in data:
        if key not in known:
            where = f"{path}.{key}" if path else str(key)
            raise ValueError(f"{where}: unknown field (known: {', '.join(sorted(known))})")


def _engine_from_dict(data: dict) -> EngineConfig:
    require(isinstance(data, dict), f"engine must be a mapping, got {type(data).__name__}")
    hints = {name: hint for group in _ENGINE_GROUPS for name, hint in typing.get_type_hints(group).items()}
    _check_keys(data, hints, "engine")
    kwargs = {key: _coerce(value, hints[key], f"engine.{key}") for key, value in data.items()}
    if kwargs.get("tensor_parallel_size", 1) > 1:
        # A replica's ranks are Ray actors in its placement group (cluster/ray_executor.py) unless the
        # YAML asks for "mp": k local processes inside one replica actor that holds k GPUs.
        kwargs.setdefault("distributed_executor_backend", "ray")
    try:
        return EngineConfig.from_kwargs(**kwargs)
    except ValueError as exc:
        raise ValueError(_with_path(str(exc), "engine", hints)) from None


def _build(cls, data: Any, path: str):
    """A frozen dataclass from a mapping: unknown keys, types and values are checked, nested dataclasses recurse."""
    require(isinstance(data, dict), f"{path} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    _check_keys(data, hints, path)
    kwargs = {}
    for key, value in data.items():
        hint, where = hints[key], f"{path}.{key}"
        kwargs[key] = _build(hint, value or {}, where) if dataclasses.is_dataclass(hint) else _coerce(value, hint, where)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ValueError(_with_path(str(exc), path, hints)) from None


def _with_path(message: str, path: str, fields) -> str:
    """'max_num_seqs must be >= 1' -> 'engine.max_num_seqs must be >= 1' (messages start with the field name)."""
    first = message.split(" ", 1)[0]
    if first in fields:
        return f"{path}.{message}"
    return message if message.startswith(("deployment.", "engine.", "router.", "autoscaling.")) else f"{path}: {message}"


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against a field's type: int, float (ints accepted), bool, str, Literal, Optional."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or (origin is not None and type(None) in args):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is Literal:
        require(value in args, f"{where} must be one of {args}, got {value!r}")
        return value
    if hint is bool:
        require(isinstance(value, bool), f"{where} must be true or false, got {value!r}")
    elif hint is int:
        require(isinstance(value, int) and not isinstance(value, bool), f"{where} must be an integer, got {value!r}")
    elif hint is float:
        require(isinstance(value, (int, float)) and not isinstance(value, bool), f"{where} must be a number, got {value!r}")
        return float(value)
    elif hint is str:
        require(isinstance(value, str), f"{where} must be a string, got {value!r}")
    return value
