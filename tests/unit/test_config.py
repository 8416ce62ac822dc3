"""Frozen, validated config; SamplingParams checks that need no model."""

from __future__ import annotations

import dataclasses

import pytest

from pagoda.engine.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from pagoda.engine.sampling_params import SamplingParams


def test_configs_are_frozen():
    config = EngineConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.cache.block_size = 32  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingParams().temperature = 2.0  # type: ignore[misc]


def test_from_kwargs_routes_flat_arguments_to_their_group():
    config = EngineConfig.from_kwargs(model="m", block_size=32, max_num_seqs=4, tensor_parallel_size=1)
    assert config.model.model == "m" and config.cache.block_size == 32 and config.scheduler.max_num_seqs == 4
    with pytest.raises(TypeError, match="unknown engine argument 'bogus'"):
        EngineConfig.from_kwargs(bogus=1)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: CacheConfig(block_size=0), "block_size must be >= 1"),
        (lambda: CacheConfig(gpu_memory_utilization=1.5), r"gpu_memory_utilization must be in \(0, 1\]"),
        (lambda: SchedulerConfig(max_num_seqs=0), "max_num_seqs must be >= 1"),
        (lambda: SchedulerConfig(policy="lifo"), "policy must be one of"),
        (lambda: SchedulerConfig(tenant_weights={"a": 0}), "tenant_weights values must be positive finite numbers"),
        (lambda: SchedulerConfig(tenant_weights={"a": float("inf")}), "tenant_weights values must be positive"),
        (lambda: SchedulerConfig(tenant_weights="a=1"), "tenant_weights must be a mapping"),
        (lambda: SchedulerConfig(target_tpot_ms=0), "target_tpot_ms must be a positive finite number"),
        (lambda: SchedulerConfig(target_tpot_ms=float("nan")), "target_tpot_ms must be a positive finite number"),
        (lambda: SchedulerConfig(target_ttft_ms=500), "target_ttft_ms needs target_tpot_ms"),
        (lambda: SchedulerConfig(target_tpot_ms=50, enable_chunked_prefill=False),
         "target_tpot_ms needs enable_chunked_prefill"),
        (lambda: ModelConfig(dtype="int3"), "dtype must be one of"),
        (lambda: ModelConfig(max_model_len=0), "max_model_len must be >= 1"),
        (lambda: ParallelConfig(distributed_executor_backend="slurm"),
         r"distributed_executor_backend must be one of \('mp', 'ray'\), got 'slurm'"),
    ],
)
def test_bad_config_names_the_field(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1.0), r"temperature must be in \[0, 100\]"),
        (dict(temperature=1e308), r"temperature must be in \[0, 100\], got 1e\+308"),
        (dict(temperature=float("inf")), r"temperature must be in \[0, 100\], got inf"),
        (dict(temperature=float("nan")), r"temperature must be in \[0, 100\], got nan"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_k=0), "top_k must be -1"),
        (dict(min_p=1.5), r"min_p must be in \[0, 1\]"),
        (dict(repetition_penalty=0.0), r"repetition_penalty must be in \(0, 100\]"),
        (dict(repetition_penalty=float("inf")), r"repetition_penalty must be in \(0, 100\], got inf"),
        (dict(presence_penalty=3.0), r"presence_penalty must be in \[-2, 2\]"),
        (dict(frequency_penalty=-3.0), r"frequency_penalty must be in \[-2, 2\]"),
        (dict(max_tokens=0), "max_tokens must be >= 1"),
        (dict(min_tokens=5, max_tokens=4), r"min_tokens must be in \[0, max_tokens=4\]"),
        (dict(n=65), r"n must be in \[1, 64\]"),
        (dict(logprobs=21), r"logprobs must be in \[0, 20\]"),
        (dict(seed=-1), r"seed must be in \[0, 2\*\*63\)"),
        (dict(stop=[""]), "stop strings must be non-empty"),
        (dict(stop=["x" * 300]), "at most 256 characters"),
        (dict(stop_token_ids=[-3]), "stop_token_ids must be ids >= 0"),
    ],
)
def test_bad_sampling_params_name_field_and_limit(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_stop_accepts_a_single_string():
    assert SamplingParams(stop="###").stop == ("###",)


def _hf(**fields):
    from types import SimpleNamespace

    return SimpleNamespace(**fields)


@pytest.mark.parametrize(
    "hf, limit",
    [
        (_hf(max_position_embeddings=32768, sliding_window=4096), (4096, "sliding_window")),  # Mistral v0.1
        (_hf(max_position_embeddings=32768, sliding_window=4096, use_sliding_window=False), (32768, "max_position_embeddings")),
        (_hf(max_position_embeddings=8192, sliding_window=None), (8192, "max_position_embeddings")),
        (_hf(max_position_embeddings=2048, sliding_window=4096), (2048, "max_position_embeddings")),
        (_hf(), (2048, "max_position_embeddings")),
    ],
)
def test_context_limit_is_the_smaller_of_positions_and_window(hf, limit):
    from pagoda.engine.config import model_context_limit

    assert model_context_limit(hf) == limit


def test_max_model_len_defaults_to_the_limit_and_may_not_exceed_it():
    from pagoda.engine.config import resolve_max_model_len

    mistral = _hf(max_position_embeddings=32768, sliding_window=4096)
    assert resolve_max_model_len(ModelConfig(), mistral) == 4096
    assert resolve_max_model_len(ModelConfig(max_model_len=1000), mistral) == 1000
    with pytest.raises(ValueError, match=r"max_model_len \(8192\) must be <= the model's sliding_window \(4096\)"):
        resolve_max_model_len(ModelConfig(max_model_len=8192), mistral)


def test_tenant_weights_are_kept_as_sorted_pairs():
    config = SchedulerConfig(policy="fair", tenant_weights={"b": 3, "a": 1})
    assert config.tenant_weights == (("a", 1.0), ("b", 3.0))
    assert SchedulerConfig(policy="fair", tenant_weights=config.tenant_weights) == config  # the stored form is accepted again
    hash(config)  # still a frozen, hashable value
