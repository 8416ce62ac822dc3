"""Ordering policies: which waiting request is admitted first, which running one is preempted first.

A policy is a pure function from a request (and the current step) to a sort key; smaller keys
run first and are preempted last. Policies read only plain request fields, so they can be
unit-tested with fake requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class Orderable(Protocol):
    priority: int
    arrival_time: float


class SchedulingPolicy(Protocol):
    def key(self, request: Orderable, waited_steps: int) -> tuple:
        """Sort key; ``waited_steps`` is how many scheduler steps the request has been waiting."""
        ...


@dataclass(frozen=True)
class FCFSPolicy:
    """First come, first served: arrival time alone."""

    def key(self, request: Orderable, waited_steps: int) -> tuple:
        return (request.arrival_time,)


@dataclass(frozen=True)
class PriorityPolicy:
    """Lower ``priority`` first; ties by arrival. Aging: a waiting request gains one level every
    ``aging_steps`` steps, so under constant high-priority load a request of priority p is admitted
    once p - p_high levels have been earned, plus the time to drain what is ahead of it."""

    aging_steps: int

    def key(self, request: Orderable, waited_steps: int) -> tuple:
        return (request.priority - waited_steps // self.aging_steps, request.arrival_time)


def make_policy(name: str, aging_steps: int) -> SchedulingPolicy:
    if name == "fcfs":
        return FCFSPolicy()
    if name == "priority":
        return PriorityPolicy(aging_steps)
    raise ValueError(f"policy must be 'fcfs' or 'priority', got {name!r}")
