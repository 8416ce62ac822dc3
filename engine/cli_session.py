"""The engine behind the CLI: builds it from parsed flags and streams text to a terminal.

``--graph`` puts the graph's text before the first user message, as the APIs do (``graph_request.py``):
in ``chat`` at every turn, so each turn's prompt starts with the same cached prefix."""

from __future__ import annotations

import argparse
import itertools
import sys
from typing import TextIO

from pagoda.engine.config import EngineConfig
from pagoda.engine.graph_prompt import DEFAULT_ENCODING
from pagoda.engine.graph_request import GraphRequest
from pagoda.engine.llm_engine import LLMEngine
from pagoda.engine.output_processor import OutputKind
from pagoda.engine.request_fields import Exposed, request_fields
from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.tokenizer import encode_chat


def sampling_params_from_args(args: argparse.Namespace) -> SamplingParams:
    """Every field the CLI offers (its metadata names a flag, whose dest is the field's name)."""
    return SamplingParams(**{f.name: getattr(args, f.name) for f in request_fields(SamplingParams)
                             if isinstance(f.spec.cli, Exposed)})


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig.from_kwargs(
        model=args.model, dtype=args.dtype, device=args.device, quantization=args.quantization,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size, cpu_kv_cache_gib=args.kv_cache_gib, kv_cache_dtype=args.kv_cache_dtype,
        enable_prefix_caching=not args.no_prefix_caching,
    )


class CliSession:
    def __init__(self, args: argparse.Namespace, out: TextIO = sys.stdout) -> None:
        self.params = sampling_params_from_args(args)  # bad flags fail before the model loads
        self.graph = None if args.graph is None else GraphRequest(args.graph, args.graph_encoding or DEFAULT_ENCODING)
        self.engine = LLMEngine(engine_config_from_args(args))
        self.out = out
        self._ids = (str(i) for i in itertools.count())

    def generate(self, prompt: str, raw: bool = False) -> int:
        tokenizer = self.engine.tokenizer
        if raw or (not tokenizer.chat_template and self.graph is None):  # a graph needs the template: it says so
            self._stream(prompt)
        else:
            self._stream({"prompt_token_ids": self._chat_ids([{"role": "user", "content": prompt}])})
        return 0

    def chat(self, system: str | None) -> int:
        messages = [{"role": "system", "content": system}] if system else []
        while True:
            try:
                user = input("you> ")
            except EOFError:
                self.out.write("\n")
                return 0
            if not user.strip():
                continue
            messages.append({"role": "user", "content": user})
            self.out.write("pagoda> ")
            reply = self._stream({"prompt_token_ids": self._chat_ids(messages)})
            messages.append({"role": "assistant", "content": reply})

    def _chat_ids(self, messages: list[dict]) -> list[int]:
        """The conversation through the chat template, with the graph (if any) in its first user message."""
        return encode_chat(self.engine.tokenizer, self.graph.into(messages) if self.graph else messages)

    def _stream(self, prompt) -> str:
        """Print text as it is generated; returns the whole reply."""
        self.engine.add_request(next(self._ids), prompt, self.params, output_kind=OutputKind.DELTA)
        pieces = []
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                for completion in output.outputs:
                    pieces.append(completion.text)
                    self.out.write(completion.text)
                    self.out.flush()
        self.out.write("\n")
        return "".join(pieces)
