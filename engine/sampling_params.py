"""SamplingParams: how to pick tokens and when to stop, with vLLM's names.

Checks that need nothing but the parameters run at construction; checks that need the model
(vocabulary size, context length) run in ``validate_for_model``, which the engine calls before a
request is admitted. Every failure is a ValueError naming the field and the limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagoda.engine.config import require
from pagoda.engine.request_fields import custom, hidden, spec
from pagoda.engine.structured.spec import StructuredOutputSpec

MAX_N = 64
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_LOGPROBS = 20
# Upper bounds that keep sampling meaningful: logits / 1e308 are all zero (uniform noise), and a
# penalty of 1e308 turns every seen token's logit into +-inf (OpenAI's API stops temperature at 2).
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 100.0
_SEED_LIMIT = 2**63


def _as_tuple(value, name: str) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (str, int)):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be a list, got {type(value).__name__}") from None


@dataclass(frozen=True)
class SamplingParams:
    # Each field's metadata is its contract with the front ends (engine/request_fields.py): its help text and
    # its name in the OpenAI body, the pagoda.v1 SamplingParams message and the CLI, or why one leaves it out.
    n: int = field(default=1, metadata=spec(
        "completions per prompt", openai="n", grpc="n", cli=hidden("the terminal shows one completion")))
    temperature: float = field(default=1.0, metadata=spec(
        "sampling temperature; 0 is greedy", openai="temperature", grpc="temperature", cli="--temperature",
        cli_default=0.0))  # a terminal answer is greedy unless asked otherwise
    top_p: float = field(default=1.0, metadata=spec(
        "nucleus sampling mass, in (0, 1]", openai="top_p", grpc="top_p", cli="--top-p"))
    top_k: int = field(default=-1, metadata=spec(
        "keep the k most likely tokens; -1 disables", openai="top_k", grpc="top_k", cli="--top-k"))
    min_p: float = field(default=0.0, metadata=spec(
        "drop tokens below min_p x p(most likely), in [0, 1]", openai="min_p", grpc="min_p", cli="--min-p"))
    repetition_penalty: float = field(default=1.0, metadata=spec(
        "> 0; divides positive logits of prompt and output tokens (> 1 discourages repeats)",
        openai="repetition_penalty", grpc="repetition_penalty", cli="--repetition-penalty"))
    presence_penalty: float = field(default=0.0, metadata=spec(
        "in [-2, 2]; subtracted once per token present in the output",
        openai="presence_penalty", grpc="presence_penalty", cli="--presence-penalty"))
    frequency_penalty: float = field(default=0.0, metadata=spec(
        "in [-2, 2]; subtracted per occurrence in the output",
        openai="frequency_penalty", grpc="frequency_penalty", cli="--frequency-penalty"))
    seed: int | None = field(default=None, metadata=spec(
        "per-request generator; same seed, same tokens", openai="seed", grpc="seed", cli="--seed"))
    stop: tuple[str, ...] = field(default=(), metadata=spec(
        "strings that end generation; never in returned text",
        openai=custom("stop", "a string or a list of strings"), grpc="stop",
        cli=custom("--stop", "one string per flag, repeated")))
    stop_token_ids: tuple[int, ...] = field(default=(), metadata=spec(
        "token ids that end generation", openai="stop_token_ids", grpc="stop_token_ids",
        cli=custom("--stop-token-ids", "several ids after one flag")))
    max_tokens: int = field(default=16, metadata=spec(
        "output tokens at most", openai="max_tokens", grpc="max_tokens", cli="--max-tokens",
        cli_default=256))  # a terminal answer is a few sentences; chat's max_completion_tokens is an alias
    min_tokens: int = field(default=0, metadata=spec(
        "EOS and stop token ids are masked until this many tokens were generated",
        openai="min_tokens", grpc="min_tokens", cli="--min-tokens"))
    ignore_eos: bool = field(default=False, metadata=spec(
        "keep generating past EOS (benchmarks)", openai="ignore_eos", grpc="ignore_eos", cli="--ignore-eos"))
    logprobs: int | None = field(default=None, metadata=spec(
        "return the sampled token's logprob plus this many top ones",
        openai=custom("logprobs", "an int on /v1/completions; on chat a bool, with top_logprobs the count"),
        grpc="logprobs", cli=hidden("the terminal shows text, not logprobs")))
    skip_special_tokens: bool = field(default=True, metadata=spec(
        "leave special tokens out of the returned text (detokenization)",
        openai="skip_special_tokens", grpc="skip_special_tokens",
        cli=hidden("the terminal shows the answer as a user reads it; the APIs return special tokens on request")))
    structured: StructuredOutputSpec | None = field(default=None, metadata=spec(
        "the grammar the output must match (engine/structured/)",
        openai=custom("response_format", "response_format or vLLM's structured_outputs (structured.from_openai)"),
        grpc=custom("structured", "a StructuredOutput message (grpc_request.structured_spec)"),
        cli=custom("--json-schema", "one of --json-schema, --regex, --grammar (engine/cli_inputs.py)")))

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", _as_tuple(self.stop, "stop"))
        object.__setattr__(self, "stop_token_ids", _as_tuple(self.stop_token_ids, "stop_token_ids"))
        self._validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def plain_greedy(self) -> bool:
        """Temperature 0 and nothing that changes or reports the logits: no penalties, min_tokens bans,
        logprobs or grammar. The argmax of the raw logits is then all its sampling needs, so the runner
        may take the device-side greedy head and launch the next step before this one's token reaches
        the host; a structured request never may (its mask needs the previous token accepted)."""
        return (
            self.temperature == 0.0 and self.repetition_penalty == 1.0 and self.frequency_penalty == 0.0
            and self.presence_penalty == 0.0 and self.min_tokens == 0 and self.logprobs is None
            and self.structured is None
        )

    def _validate(self) -> None:
        require(isinstance(self.n, int) and 1 <= self.n <= MAX_N, f"n must be in [1, {MAX_N}], got {self.n}")
        require(0.0 <= self.temperature <= MAX_TEMPERATURE,
                f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature}")
        require(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        require(
            isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k >= 1),
            f"top_k must be -1 (disabled) or >= 1, got {self.top_k}",
        )
        require(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}")
        require(0.0 < self.repetition_penalty <= MAX_REPETITION_PENALTY,
                f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}], got {self.repetition_penalty}")
        require(-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        require(
            -2.0 <= self.frequency_penalty <= 2.0, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"
        )
        require(
            self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < _SEED_LIMIT),
            f"seed must be in [0, 2**63), got {self.seed}",
        )
        require(isinstance(self.max_tokens, int) and self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}")
        require(
            isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
            f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}",
        )
        require(
            self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
            f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}",
        )
        self._validate_stops()
        require(
            self.structured is None or isinstance(self.structured, StructuredOutputSpec),
            f"structured must be a StructuredOutputSpec or None, got {type(self.structured).__name__}",
        )

    def _validate_stops(self) -> None:
        require(
            len(self.stop) <= MAX_STOP_STRINGS, f"stop must have at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}"
        )
        for s in self.stop:
            require(isinstance(s, str) and s != "", "stop strings must be non-empty strings")
            require(
                len(s) <= MAX_STOP_STRING_CHARS,
                f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters, got {len(s)}",
            )
        require(
            len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS,
            f"stop_token_ids must have at most {MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}",
        )
        for t in self.stop_token_ids:
            require(isinstance(t, int) and t >= 0, f"stop_token_ids must be ids >= 0, got {t}")

    def validate_for_model(self, num_prompt_tokens: int, vocab_size: int, max_model_len: int) -> None:
        """Checks that need the model: context length and vocabulary."""
        require(num_prompt_tokens >= 1, "prompt must not be empty")
        require(
            num_prompt_tokens + self.max_tokens <= max_model_len,
            f"prompt length ({num_prompt_tokens}) + max_tokens ({self.max_tokens}) must be <= "
            f"max_model_len ({max_model_len})",
        )
        for t in self.stop_token_ids:
            require(t < vocab_size, f"stop_token_ids must be < vocab_size ({vocab_size}), got {t}")
