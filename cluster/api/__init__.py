"""The API front doors: the ``pagoda.v1`` gRPC service and the OpenAI-compatible HTTP API.

``ApiServers.start(handle, app_config, ApiConfig(...))`` (``pagoda.cluster.api.server``) runs both in front
of the engine deployment; ``pagoda serve`` does so by default. See docs/architecture.md.
"""
