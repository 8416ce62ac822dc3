"""The model runner of one tensor-parallel rank: rank 0 samples, every rank appends the same tokens.

Every rank runs the same forward. Two ways to the tokens, chosen identically on every rank from
the same ``SchedulerOutput``:

- every sampled row plain greedy (the common case): the base runner's greedy head, where each rank
  gets the full-vocabulary argmax from an all-gather of (max, id) pairs
  (``ParallelLMHead.greedy``); no logits move and nothing is broadcast, this class is not involved;
- otherwise the LM head gathers the logits to rank 0 only (the others get None from
  ``compute_logits``). Rank 0 samples exactly as a single-rank runner would (penalties, seeds,
  logprobs), then broadcasts the sampled ids, one int64 per sampled row, shape ``(S,)``; the
  other ranks append those ids to their own copies of the requests, so the next step's input ids
  agree everywhere. S is the same on every rank because it is derived from the same
  ``SchedulerOutput``, so the broadcast shape needs no negotiation.

Extension point: ``ModelRunner.sample_rows(sample_req_ids, logits) -> {req_id: (token_id, logprobs)}``,
which samples and appends; this class overrides only that.
"""

from __future__ import annotations

import torch

from pagoda.engine.distributed import TPGroup
from pagoda.engine.worker.model_runner import ModelRunner


class TPModelRunner(ModelRunner):
    def __init__(self, *args, tp: TPGroup, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tp = tp

    def sample_rows(self, sample_req_ids: list[str], logits: torch.Tensor | None) -> dict:
        if self.tp.is_first:
            by_req = super().sample_rows(sample_req_ids, logits)  # samples and appends
            ids = torch.tensor([by_req[r][0] for r in sample_req_ids], dtype=torch.long, device=self.device)
            self.tp.broadcast(ids, src=0)
            return by_req
        ids = torch.empty(len(sample_req_ids), dtype=torch.long, device=self.device)  # (S,)
        token_ids = self.tp.broadcast(ids, src=0).tolist()
        for req_id, token_id in zip(sample_req_ids, token_ids):
            self.requests[req_id].append(token_id)  # keeps its token views in step, like sampling does
        return {req_id: (token_id, None) for req_id, token_id in zip(sample_req_ids, token_ids)}
