"""OutputProcessor logprobs: same outputs as a from-scratch conversion, each token decoded once.

Streaming logprobs used to rebuild every token's dict (with a ``decode`` per entry) on every step,
which is quadratic in the output length; these tests pin the incremental conversion.
"""

from __future__ import annotations

import random

import pytest

from pagoda.engine.core_output import CoreOutput
from pagoda.engine.input_processor import PreparedRequest
from pagoda.engine.output_processor import OutputKind, OutputProcessor, child_ids
from pagoda.engine.request import Logprob, Request, RequestStatus
from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.scheduler_output import TokenLogprobs

VOCAB = 40
NUM_TOP = 3
PROMPT = [5, 6, 7]


class CountingTokenizer:
    """One letter per id. Counts the single-token decodes of logprobs: the detokenizer always
    passes keyword arguments, logprob conversion passes none."""

    def __init__(self) -> None:
        self.logprob_decodes = 0

    def decode(self, ids, **kwargs) -> str:
        if not kwargs:
            self.logprob_decodes += 1
        return "".join(chr(ord("a") + i % 26) for i in ids)


def reference(tokenizer: CountingTokenizer, request: Request) -> tuple[list[dict[int, Logprob]], float]:
    """The from-scratch conversion of all of a request's logprobs (what every step used to do)."""
    dicts = []
    for entry, token_id in zip(request.output_logprobs, request.output_token_ids):
        d = {tid: Logprob(lp, rank, tokenizer.decode([tid]))
             for rank, (tid, lp) in enumerate(zip(entry.top_ids, entry.top_logprobs), start=1)}
        d.setdefault(token_id, Logprob(entry.token_logprob, entry.token_rank, tokenizer.decode([token_id])))
        dicts.append(d)
    return dicts, sum(e.token_logprob for e in request.output_logprobs)


def random_logprobs(rng: random.Random, token_id: int) -> TokenLogprobs:
    top_ids = rng.sample(range(VOCAB), NUM_TOP)  # the sampled token is in the top ones only sometimes
    top = sorted((-rng.random() * 10 ** rng.randint(-3, 2) for _ in top_ids), reverse=True)  # varied magnitudes
    rank = top_ids.index(token_id) + 1 if token_id in top_ids else NUM_TOP + rng.randint(1, 5)
    own = top[rank - 1] if rank <= NUM_TOP else top[-1] - rng.random()
    return TokenLogprobs(own, rank, top_ids, top)


def news(request: Request) -> CoreOutput:
    """What the engine core hands on for ``request``'s tokens not handed on yet."""
    start, request.num_reported_tokens = request.num_reported_tokens, request.num_output_tokens
    return CoreOutput(request.request_id, request.output_token_ids[start:], request.output_logprobs[start:],
                      request.status.finish_reason, request.stop_reason, 0)


def num_entries(request: Request) -> int:
    """Logprob dict entries (one decode each: the sampled token too, unless among the top) so far."""
    return sum(len(set(e.top_ids) | {t}) for e, t in zip(request.output_logprobs, request.output_token_ids))


@pytest.mark.parametrize("kind", list(OutputKind))
@pytest.mark.parametrize("n", [1, 2])
def test_streamed_logprobs_match_a_from_scratch_conversion_and_decode_each_token_once(kind, n):
    rng = random.Random(f"{kind.value}-{n}")
    tokenizer = CountingTokenizer()
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(n=n, max_tokens=64, logprobs=NUM_TOP)
    prepared = PreparedRequest("r", None, PROMPT, params, 0, 0.0)
    children = [Request(child, list(PROMPT), params, (0,)) for child in child_ids("r", n)]
    processor.add(prepared, kind)

    sent = {c.request_id: ([], []) for c in children}  # DELTA: token ids and logprobs received so far
    first_cumulative = None
    num_steps = 12
    for step in range(num_steps):
        last = step == num_steps - 1
        # the first child gets tokens every step; a sibling may lag (even have none yet)
        updated = [c for i, c in enumerate(children) if i == 0 or last or rng.random() < 0.6]
        for request in updated:
            for _ in range(rng.choice([1, 1, 2, 3])):  # a step may append several tokens
                token_id = rng.randrange(1, VOCAB)
                request.append_output_token(token_id, random_logprobs(rng, token_id))
            if last:
                request.status = RequestStatus.FINISHED_LENGTH
        outputs, stopped = processor.process([news(r) for r in updated])
        assert stopped == []

        # (b) each token's entries were decoded exactly once, however many steps re-emitted them
        if kind is not OutputKind.FINAL or last:
            assert tokenizer.logprob_decodes == sum(num_entries(c) for c in children)
        if kind is OutputKind.FINAL and not last:
            assert outputs == []
            continue

        # (a) the outputs equal a from-scratch conversion, cumulative_logprob to the last bit
        (output,) = outputs
        for completion, request in zip(output.outputs, children):
            ref_dicts, ref_sum = reference(CountingTokenizer(), request)  # its own: keeps the count above
            assert repr(completion.cumulative_logprob) == repr(ref_sum)
            if kind is OutputKind.DELTA:
                token_ids, logprobs = sent[request.request_id]
                assert completion.logprobs == ref_dicts[len(logprobs) :]
                token_ids += completion.token_ids
                logprobs += completion.logprobs
                assert token_ids == request.output_token_ids and logprobs == ref_dicts
            else:
                assert completion.token_ids == request.output_token_ids
                assert completion.logprobs == ref_dicts
        if first_cumulative is None and kind is OutputKind.CUMULATIVE:
            first_cumulative = (output.outputs[0].logprobs, len(output.outputs[0].logprobs))

    if kind is OutputKind.CUMULATIVE:
        handed_out, length = first_cumulative
        assert len(handed_out) == length < children[0].num_output_tokens  # a handed-out list never grows
    assert not processor.has("r")  # finished: forgotten


def test_no_logprobs_asked_gives_none_and_decodes_nothing():
    tokenizer = CountingTokenizer()
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(max_tokens=8)
    request = Request("r", list(PROMPT), params, (0,))
    processor.add(PreparedRequest("r", None, PROMPT, params, 0, 0.0), OutputKind.DELTA)
    for token_id in (3, 4, 5):
        request.append_output_token(token_id)
        (output,), _ = processor.process([news(request)._replace(new_logprobs=None)])
        assert output.outputs[0].logprobs is None and output.outputs[0].cumulative_logprob is None
    assert tokenizer.logprob_decodes == 0
