"""The offline API, in vLLM's shape::

    from pagoda import LLM, SamplingParams
    llm = LLM()                                  # the embedded SmolLM2-135M-Instruct
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    print(outs[0].outputs[0].text)

    # a vision-language model (GLM-4.1V): images as chat content parts, or beside a prompt
    llm.chat([{"role": "user", "content": [{"type": "image_pil", "image_pil": screenshot},
                                           {"type": "text", "text": "What app is open?"}]}])
    llm.generate({"prompt": "<|begin_of_image|><|image|><|end_of_image|>Describe it.",
                  "multi_modal_data": {"image": screenshot}})
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from tqdm.auto import tqdm

from pagoda.engine.config import EMBEDDED_MODEL, EngineConfig
from pagoda.engine.input_processor import PromptType, has_images
from pagoda.engine.llm_engine import LLMEngine
from pagoda.engine.multimodal.chat import split_images
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
        jobs = [(str(next(self._ids)), p, sp, pr) for p, sp, pr in zip(prompts, params, priorities)]
        prepared = self._prepare(jobs)  # everything validated before anything is queued
        for request in prepared:
            self.engine.add_prepared(request, OutputKind.FINAL)
        return self._run([r.request_id for r in prepared], use_tqdm)

    def _prepare(self, jobs: list[tuple]) -> list:
        """``InputProcessor.process`` of every prompt; prompts with images on a few threads (decoding
        and resizing a screenshot is tens of ms of PIL and numpy work, which releases the GIL)."""
        process = self.engine.inputs.process
        if sum(has_images(job[1]) for job in jobs) < 2:
            return [process(*job) for job in jobs]
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            return list(pool.map(lambda job: process(*job), jobs))

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or several; the chat template adds the reply prompt.
        A user message's content may be a list of parts, as in OpenAI's API and vLLM: ``{"type": "text"}``,
        ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``,
        ``{"type": "image_pil", "image_pil": PIL.Image}``. A bad image is a ValueError naming its part."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self._chat_prompt(conv) for conv in conversations]
        try:
            return self.generate([p for p, _ in prompts], sampling_params, use_tqdm=use_tqdm)
        except ValueError as exc:  # the engine names image k of a prompt; say which part it was
            raise ValueError(_named_image(str(exc), [fields for _, fields in prompts])) from None

    def _chat_prompt(self, messages: list[dict]) -> tuple[dict, list[str]]:
        """(the engine prompt of one conversation, the message part each of its images came from)."""
        messages, images = split_images(messages, text_only=self.engine.inputs.mm_processor is None)
        prompt: dict = {"prompt_token_ids": encode_chat(self.engine.tokenizer, messages)}
        if images:
            prompt["multi_modal_data"] = {"image": [source for _, source in images]}
        return prompt, [field for field, _ in images]

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


def _named_image(message: str, fields: list[list[str]]) -> str:
    """'multi_modal_data.image[0]: ...' -> 'messages[1].content[0].image_url: ...' when one conversation
    has images (with several, the engine's message does not say whose image it was)."""
    with_images = [f for f in fields if f]
    match = re.match(r"multi_modal_data\.image\[(\d+)\]", message)
    if match is None or len(with_images) != 1 or int(match.group(1)) >= len(with_images[0]):
        return message
    return with_images[0][int(match.group(1))] + message[match.end():]


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
