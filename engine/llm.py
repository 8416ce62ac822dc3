"""The offline API, in vLLM's shape::

    from pagoda import LLM, SamplingParams
    llm = LLM()                                  # the embedded SmolLM2-135M-Instruct
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    print(outs[0].outputs[0].text)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from tqdm.auto import tqdm

from pagoda.engine.config import EMBEDDED_MODEL, EngineConfig
from pagoda.engine.input_processor import PromptType
from pagoda.engine.llm_engine import LLMEngine
from pagoda.engine.output_processor import OutputKind
from pagoda.engine.request import RequestOutput
from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.tokenizer import encode_chat

_PROGRESS_MIN_PROMPTS = 8  # no bar for a handful of prompts


class LLM:
    def __init__(self, model: str = EMBEDDED_MODEL, **engine_kwargs) -> None:
        """``engine_kwargs`` are EngineConfig fields (max_num_seqs, block_size, dtype, ...)."""
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, **engine_kwargs))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        priority: Sequence[int] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run prompts (text, token ids, or dicts) to completion; outputs come back in prompt order."""
        prompts = _as_prompt_list(prompts)
        params = _per_prompt(sampling_params or SamplingParams(), len(prompts), "sampling_params")
        priorities = _per_prompt(list(priority) if priority is not None else 0, len(prompts), "priority")
        prepared = [  # validate everything before anything is queued
            self.engine.inputs.process(str(next(self._ids)), p, sp, pr) for p, sp, pr in zip(prompts, params, priorities)
        ]
        for request in prepared:
            self.engine.add_prepared(request, OutputKind.FINAL)
        return self._run([r.request_id for r in prepared], use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or several; the chat template adds the reply prompt."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": encode_chat(self.engine.tokenizer, conv)} for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm or len(request_ids) < _PROGRESS_MIN_PROMPTS)
        try:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        done[output.request_id] = output
                        bar.update(1)
        except BaseException:
            self.engine.abort_request(request_ids)
            raise
        finally:
            bar.close()
        return [done[r] for r in request_ids]


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # a single prompt given as token ids
    return prompts


def _per_prompt(value, count: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name} must have one entry per prompt ({count}), got {len(value)}")
        return list(value)
    return [value] * count
