"""pagoda's cluster layer: engine replicas as a Ray Serve deployment behind a KV-occupancy router.

    cluster.config          AppConfig: the application YAML (engine, deployment, router, autoscaling)
    cluster.app             build_app(args) for KubeRay, deploy(config) for `pagoda serve` and tests
    cluster.client          PagodaClient: tokenize, stream, cancel, fail over before the first token
    cluster.routing_policy  the pure ranking function the router calls
    cluster.ray_executor    RayExecutor: an engine's tensor-parallel ranks as Ray actors in a placement group

Importing ``cluster`` imports nothing heavy; ``config``, ``routing_policy``, ``inflight`` and
``routing_stats`` need neither Ray nor torch.
"""
