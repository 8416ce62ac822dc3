"""Serve autoscaling on load and KV occupancy: a custom policy for Ray Serve 2.60.

Serve's default policy sizes a deployment on ongoing requests alone (``total / target_ongoing``).
An LLM replica can be full long before that: a few long contexts fill its KV cache, and then new
requests wait or preempt. So pagoda wants as many replicas as either signal asks for:

    desired = max(ongoing / target_ongoing_requests,  current x mean KV usage / target_kv_usage)

``desired_replicas`` is that rule as a pure function. ``KVAwarePolicy`` adapts it to Serve: it reads
the ongoing requests Serve measures and the ``kv_cache_usage`` each replica reports through
``LLMReplica.record_autoscaling_stats``; Serve itself then applies min/max replicas, the scaling
factors and the upscale/downscale delays (``_apply_autoscaling_config`` wraps every custom policy).
"""

from __future__ import annotations

KV_METRIC = "kv_cache_usage"  # the key LLMReplica.record_autoscaling_stats publishes


def desired_replicas(current: int, ongoing: float, target_ongoing: float, kv_usages: list[float],
                     target_kv_usage: float) -> float:
    """Replicas wanted (unrounded; Serve rounds and bounds it).

    current: running replicas; ongoing: requests running or queued, all replicas together;
    kv_usages: the replicas' KV occupancy in [0, 1] (missing replicas simply not listed).
    """
    if current == 0:
        return ongoing / target_ongoing  # nothing to measure KV on; cold start goes by requests
    by_load = ongoing / target_ongoing
    by_kv = current * (sum(kv_usages) / len(kv_usages)) / target_kv_usage if kv_usages else 0.0
    return max(by_load, by_kv)


class KVAwarePolicy:
    """The Serve policy (``AutoscalingPolicy(policy_function=KVAwarePolicy, policy_kwargs=...)``);
    Serve instantiates it once with ``policy_kwargs`` and calls it every control-loop tick."""

    def __init__(self, target_kv_usage: float = 0.8) -> None:
        if not 0 < target_kv_usage <= 1:
            raise ValueError(f"target_kv_usage must be in (0, 1], got {target_kv_usage}")
        self.target_kv_usage = target_kv_usage

    def __call__(self, ctx) -> tuple[float, dict]:
        kv = (ctx.aggregated_metrics or {}).get(KV_METRIC, {})
        running = set(ctx.running_replicas)
        usages = [float(v) for replica, v in kv.items() if replica in running]
        desired = desired_replicas(ctx.current_num_replicas, ctx.total_num_requests,
                                   ctx.config.get_target_ongoing_requests(), usages, self.target_kv_usage)
        return desired, {}
