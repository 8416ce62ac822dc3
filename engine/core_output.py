"""What the engine core hands on per step: each scheduler request's new tokens, nothing decoded.

    core: schedule → execute → sample → token stops (EOS, stop ids, lengths)  ──CoreOutput──►
    front (OutputProcessor): detokenize, stop strings, logprob text, n completions → RequestOutput

vLLM v1 splits the work the same way: turning tokens into text costs two tokenizer calls per request
per step, and in the core it was host time that every step waited for (with 256 streams, more than the
forward itself on a small model). In the front it runs beside the next step, on the front's thread or,
with ``ProcessCore``, in another process. A stop string is found in the front, which then ends that
completion in the core (``stop_completion``); the tokens the core produced meanwhile are dropped there.

A ``CoreOutput`` is small on purpose: ``ProcessCore`` pickles one per running request per step.
"""

from __future__ import annotations

from typing import NamedTuple

from pagoda.engine.scheduler_output import TokenLogprobs


class CoreOutput(NamedTuple):
    request_id: str  # the scheduler request: the prompt's id, or "<id>#<i>" for completion i of n
    new_token_ids: list[int]  # sampled this step (a finished request's last ones included)
    new_logprobs: list[TokenLogprobs] | None  # one per new token when logprobs were asked
    finish_reason: str | None  # "stop", "length" or "abort" once the core finished it
    stop_reason: int | str | None  # the stop token id that ended it
    num_cached_tokens: int  # prompt tokens found in the prefix cache at its first scheduling
