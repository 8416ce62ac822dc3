"""Engine errors that callers (the asyncio engine, the cluster, the APIs) map to status codes.

Bad input is a plain ValueError naming the field and the limit (INVALID_ARGUMENT / 400).
"""


class QueueFullError(RuntimeError):
    """The waiting queue is at ``max_waiting`` (RESOURCE_EXHAUSTED / 429)."""


class EngineDeadError(RuntimeError):
    """A step failed; the engine can take no more requests (UNAVAILABLE / 503)."""
