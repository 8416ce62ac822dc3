"""One rank: a device, the model (this rank's shard of it), its KV cache, and the model runner.

Life cycle, driven by an executor: ``load_model`` → ``determine_num_blocks`` (a memory profile on
CUDA, a configured budget on CPU) → ``initialize_cache(num_blocks)`` → ``execute_model`` per step
(or, with async scheduling, ``launch`` then ``finish``).

The block count is returned, never written into the config: the driver takes the minimum over
ranks and tells every rank the same number.

The same class runs every rank, whoever hosts it (the engine's process for TP=1, a spawned
process per rank, a Ray actor): the host creates the ``TPGroup`` and picks this rank's device.
"""

from __future__ import annotations

import functools

import torch

from pagoda.engine.attention_metadata import AttentionMetadata
from pagoda.engine.config import EngineConfig
from pagoda.engine.distributed import SINGLE_RANK, TPGroup
from pagoda.engine.layers.cpu_gemm import pack_model
from pagoda.engine.loader import ResolvedModel, load_model
from pagoda.engine.models.base import SupportsImages
from pagoda.engine.models.registry import kv_cache_spec
from pagoda.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagoda.engine.tokenizer import load_tokenizer
from pagoda.engine.worker.model_runner import ModelRunner
from pagoda.engine.worker.runner_data import StepHandle

_PROFILE_IMAGE_SIDE = 8192  # pixels: larger than any resize cap, so the processor scales it down to the cap
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> cuda when available, else cpu; a CUDA device is ``cuda:local_rank``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def resolve_kv_cache_dtype(name: str, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV cache's element type: the model's dtype, or FP8 (CUDA's Triton kernels read and write it)."""
    if name == "auto":
        return dtype
    if device.type != "cuda":
        raise ValueError(f"kv_cache_dtype 'fp8' needs a CUDA device (the {device.type} attention path stores the model's dtype)")
    return torch.float8_e4m3fn


class Worker:
    def __init__(
        self,
        config: EngineConfig,
        model: ResolvedModel,
        tp: TPGroup = SINGLE_RANK,
        device: torch.device | None = None,
    ) -> None:
        """``device`` defaults to the config's device (``cuda:0`` for CUDA)."""
        self.config = config
        self.source = model
        self.tp = tp
        self.device = device or resolve_device(config.model.device)
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        self.kv_dtype = resolve_kv_cache_dtype(config.cache.kv_cache_dtype, self.dtype, self.device)
        self.spec = kv_cache_spec(model.hf_config, tp.world_size)
        self.model = None
        self.runner: ModelRunner | None = None

    def load_model(self) -> None:
        torch.manual_seed(self.config.model.seed)
        self.model = load_model(
            self.source.path, self.source.hf_config, self.dtype, self.device, self.tp, self.config.model.quantization
        )
        if self.device.type == "cpu":
            pack_model(self.model)  # oneDNN-packed weights for the linear layers and the LM head

    def bytes_per_block(self) -> int:
        s = self.spec
        element = torch.empty((), dtype=self.kv_dtype).element_size()
        return 2 * s.num_layers * self.config.cache.block_size * s.num_kv_heads * s.head_dim * element

    def determine_num_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_blocks is not None:
            return cache.num_blocks
        if self.device.type == "cuda":
            budget = self._profile_free_cuda_bytes()
        else:
            budget = int(cache.cpu_kv_cache_gib * 2**30)
        num_blocks = budget // self.bytes_per_block()
        if num_blocks < 1:
            raise ValueError(f"no room for a single KV block (budget {budget} bytes); lower the model size or raise the limit")
        return num_blocks

    @torch.inference_mode()
    def _profile_free_cuda_bytes(self) -> int:
        """Run the largest step once without a KV cache, then give the KV cache what is left under
        gpu_memory_utilization."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        num_tokens = self.config.scheduler.max_num_batched_tokens
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        pos = torch.arange(num_tokens, device=self.device)
        empty = [torch.empty(0, device=self.device, dtype=self.dtype)] * self.spec.num_layers
        meta = AttentionMetadata.dummy([num_tokens], [0], self.config.cache.block_size, self.device)
        hidden = self.model(ids, pos, empty, meta)
        self.model.compute_logits(hidden[-self.config.scheduler.max_num_seqs :])
        del hidden
        self._profile_vision_tower()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        return int(total * self.config.cache.gpu_memory_utilization) - peak - used_by_others

    def _profile_vision_tower(self) -> None:
        """The vision tower on the largest image the processor makes (a square at its resize cap),
        so that the KV cache leaves room for its activations."""
        if not isinstance(self.model, SupportsImages):
            return
        from pagoda.engine.multimodal.processor import make_mm_processor

        processor = make_mm_processor(self.source.path, self.source.hf_config, self.config.multimodal)
        pixels, grid = self.model.dummy_image(processor.num_image_tokens(_PROFILE_IMAGE_SIDE, _PROFILE_IMAGE_SIDE))
        self.model.encode_images(pixels, [grid])

    def initialize_cache(self, num_blocks: int) -> None:
        s = self.spec
        shape = (2, num_blocks, self.config.cache.block_size, s.num_kv_heads, s.head_dim)
        kv_caches = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in range(s.num_layers)]
        graph_seqs = 0 if self.config.model.enforce_eager else self.config.scheduler.max_num_seqs
        args = (
            self.model, kv_caches, self.config.cache.block_size, self.source.text_config.vocab_size,
            self.source.eos_token_ids,
            self.device, self.config.model.max_model_len, graph_seqs,
        )
        # the tokenizer is loaded only where a structured request is sampled (grammar compilation)
        kwargs = {"encoder_cache_tokens": self.config.multimodal.encoder_cache_tokens,
                  "load_tokenizer": functools.partial(load_tokenizer, self.config.model.tokenizer or self.source.path)}
        if self.tp.world_size == 1:
            self.runner = ModelRunner(*args, **kwargs)
        else:
            from pagoda.engine.worker.tp_runner import TPModelRunner  # rank 0 samples, the others receive its tokens

            self.runner = TPModelRunner(*args, **kwargs, tp=self.tp)
        if self.device.type == "cuda":
            self.runner.warm_up(self.config.scheduler.max_num_batched_tokens, self.config.scheduler.max_num_seqs)

    def execute_model(self, scheduled: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute(scheduled)

    def launch(self, scheduled: SchedulerOutput) -> StepHandle:
        """Queue the step (async scheduling); ``finish`` returns its result."""
        return self.runner.launch(scheduled)

    def finish(self, handle: StepHandle) -> ModelRunnerOutput:
        return self.runner.finish(handle)
