"""A test-only LLMReplica whose engine can be made to hang, as a dead device or a stuck collective would
(``stall``: the engine thread blocks at the start of its next step and never returns from it), or to fail
(``fail``: its next step raises, as a lost tensor-parallel rank makes it)."""

from __future__ import annotations

import threading

from pagoda.cluster.replica import LLMReplica


class StallingReplica(LLMReplica):
    def stall(self) -> None:
        never = threading.Event()  # nobody sets it: the replica is killed with its engine thread still waiting
        step = self.engine.engine.step_core

        def hung_step():
            never.wait()
            return step()

        self.engine.engine.step_core = hung_step

    def fail(self) -> None:
        def failing_step():
            raise RuntimeError("injected: a rank of the tensor-parallel group is gone")

        self.engine.engine.step_core = failing_step
