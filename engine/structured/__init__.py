"""Structured output: constrain what a request may generate (JSON schema, regex, EBNF, named grammars).

    spec.py      StructuredOutputSpec (what a request asks for) and ``from_openai`` (request bodies)
    registry.py  named grammars ("autoglm-action")
    grammar.py   GrammarCompiler (per tokenizer), GrammarMatcher (per request), token bitmasks
    autoglm.py   the autoglm-action grammar and Open-AutoGLM's reply parser

Importing this package loads neither torch nor xgrammar: ``spec`` is plain Python (it imports
xgrammar when a spec is built), and the ``grammar`` names load on first access.

How the engine drives it (contract for the sampler and the model runner; built in
``engine/worker/structured_state.py``, ``engine/layers/sampler.py`` and ``engine/request.py``):

1. Admission: the frontend builds the spec (``from_openai(body)``, or ``StructuredOutputSpec(...)``
   in the Python API) and puts it in the request's sampling parameters (``SamplingParams.structured``);
   malformed input is a ValueError naming the field. The spec is picklable and travels with the
   request to every rank.
2. Setup, on the rank that samples: one ``GrammarCompiler(tokenizer, vocab_size=logits width,
   stop_token_ids=EOS ids)``, built on the first structured request. A request gets
   ``compiler.matcher(spec, output_token_ids)`` the first time one of its rows is sampled there (a
   resumed request, sent in full again, replays what it already produced); its matcher is dropped when
   it finishes, is aborted or preempted. Compiling a large schema takes milliseconds to seconds;
   ``compile`` is thread-safe and cached, so it could run off the engine loop while the request waits
   (today it runs on the loop, at the request's first sampled step).
3. Each step: one mask row per constrained row, R of the step's S rows (``allocate_bitmask(R, V)``;
   the runner reuses one buffer, pinned on a GPU), filled by ``fill_bitmasks(matchers, bitmask)``;
   the mask and the batch rows it is for go to the sampler with the batch (``SamplingBatch.grammar``).
   The sampler applies ``apply_bitmask(logits, bitmask, rows)`` to its own copy of the logits after the min_tokens bans and
   before penalties, temperature, top-k/top-p and the greedy argmax, so the nucleus is taken over
   allowed tokens only. Unconstrained rows are untouched; logprobs still come from the raw logits.
4. Advance: ``matcher.accept(token)`` for every sampled token, in step order, before the row's next mask
   is filled (the runner does it at the next step, while the device runs that step's forward). A
   False means the token broke the grammar (cannot happen when the mask was applied); the runner has
   no per-request error to report, so it ends that request: its rows allow only EOS from then on, and
   a token sampled for it is replaced by EOS (the same for a grammar that fails to compile for this
   tokenizer, or a replay that does not match); logged.
   Asynchronous scheduling (a step launched before the previous step's tokens reach the host): a
   structured row's mask needs the previous token accepted, so a structured request is never plain
   greedy (``SamplingParams.plain_greedy``) and a step with a structured row never runs ahead: its
   launch first finishes the step in flight, then queues the forward pass, advances the matchers and
   fills the mask on the host (while the device runs the forward) and samples.
5. Stop: a complete match leaves only EOS allowed, so the request ends on EOS as usual and the matcher
   terminates. Two settings would fight the mask: ``ignore_eos`` and ``min_tokens``. A structured
   request stops on EOS whatever they say (EOS is sampled only after a complete match, and terminates
   the matcher), and min_tokens does not ban EOS on a row whose matcher ``is_completed()`` (else every
   token could be -inf). Stop strings and ``max_tokens`` can cut an output short of a complete match;
   the finish reason says so.
"""

from __future__ import annotations

import importlib

from pagoda.engine.structured.registry import grammar_names, register_grammar
from pagoda.engine.structured.spec import StructuredOutputError, StructuredOutputSpec, from_openai

_LAZY = {  # name -> module, imported on first access (grammar.py imports torch)
    "GrammarCompiler": "pagoda.engine.structured.grammar",
    "GrammarMatcher": "pagoda.engine.structured.grammar",
    "allocate_bitmask": "pagoda.engine.structured.grammar",
    "apply_bitmask": "pagoda.engine.structured.grammar",
    "fill_bitmasks": "pagoda.engine.structured.grammar",
    "parse_action": "pagoda.engine.structured.autoglm",
}

__all__ = [
    "GrammarCompiler", "GrammarMatcher", "StructuredOutputError", "StructuredOutputSpec", "allocate_bitmask",
    "apply_bitmask", "fill_bitmasks", "from_openai", "grammar_names", "parse_action", "register_grammar",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
