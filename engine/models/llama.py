"""Llama-architecture decoders: Llama 2/3, Mistral, SmolLM2, Qwen2 and Qwen3.

The families differ only in ``ModelSpec`` fields (``spec.py`` sets them per architecture): q/k/v,
o_proj and MLP biases, Qwen3's per-head q/k RMSNorm before RoPE (``qk_norm``), RoPE theta and
scaling. Sliding-window attention (Mistral v0.1, Qwen with ``use_sliding_window``) is not implemented: the
model is exact while sequences stay within the window.

``glm4.py`` reuses the attention and MLP classes.

Tensor parallelism: o_proj and down_proj return this rank's partial sums (``reduce_results=False``)
and the RMSNorm that follows each reduces them (``partial=True``), fused into one kernel where the
group can (``TPGroup.all_reduce_rms_norm``). So a decoder layer returns a partial hidden state
when it says ``output_is_partial``, and whatever normalises it next (the next layer's
input_layernorm, the model's final norm) reduces it. The embedding is reduced on its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn

from pagoda.engine.attention_metadata import AttentionMetadata
from pagoda.engine.distributed import SINGLE_RANK, TPGroup
from pagoda.engine.layers.activation import SiluAndMul
from pagoda.engine.layers.attention import PagedAttention
from pagoda.engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pagoda.engine.layers.layernorm import RMSNorm
from pagoda.engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from pagoda.engine.layers.rotary import get_rope
from pagoda.engine.models.base import CausalLM
from pagoda.engine.models.spec import ModelSpec


class LlamaAttention(nn.Module):
    def __init__(self, spec: ModelSpec, tp: TPGroup = SINGLE_RANK):
        super().__init__()
        hidden_size = spec.hidden_size
        self.head_dim = spec.head_dim
        total_heads = spec.num_heads
        self.qkv_proj = QKVParallelLinear(
            hidden_size, self.head_dim, total_heads, spec.num_kv_heads, bias=spec.qkv_bias, tp=tp
        )
        # This rank's heads: Hq / tp query heads and its kv heads (replicated when Hkv < tp).
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(
            total_heads * self.head_dim, hidden_size, bias=spec.o_bias, tp=tp, reduce_results=False
        )
        self.rotary_emb = get_rope(spec.rope, self.head_dim, spec.max_position_embeddings, spec.rope_neox)
        self.attn = PagedAttention(self.num_heads, self.head_dim, self.num_kv_heads, scale=self.head_dim**-0.5)
        if spec.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=spec.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=spec.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: torch.Tensor, attn: AttentionMetadata
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)  # (T, (Hq + 2*Hkv) * D)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # (T, Hq, D)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v, kv_cache, attn)  # (T, Hq*D)
        return self.o_proj(out)  # (T, hidden): this rank's partial sum


class LlamaMLP(nn.Module):
    """gate/up split by output (each rank I/tp of each), down split by input; returns this rank's
    partial sum (the caller's next norm reduces it)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, tp: TPGroup = SINGLE_RANK):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias=bias, tp=tp)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias, tp=tp, reduce_results=False)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))  # (T, H) -> (T, 2I/tp) -> (T, I/tp) -> (T, H)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block; the residual stream travels next to the hidden states so each add fuses into a norm."""

    # forward returns the MLP's partial sum (rank-local under TP) next to the reduced residual; the
    # next layer's input_layernorm or the model's norm reduces it. Layers of one model are alike, so a
    # layer's input (when it comes with a residual) is partial exactly when its output is.
    output_is_partial: ClassVar[bool] = True

    def __init__(self, spec: ModelSpec, tp: TPGroup = SINGLE_RANK):
        super().__init__()
        self.self_attn = LlamaAttention(spec, tp)
        self.mlp = LlamaMLP(spec.hidden_size, spec.intermediate_size, spec.mlp_bias, tp=tp)
        self.input_layernorm = RMSNorm(spec.hidden_size, eps=spec.rms_norm_eps, tp=tp)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, eps=spec.rms_norm_eps, tp=tp)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:  # the first layer: hidden is the (reduced) embedding
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual, partial=self.output_is_partial)
        hidden = self.self_attn(positions, hidden, kv_cache, attn)  # partial
        hidden, residual = self.post_attention_layernorm(hidden, residual, partial=True)
        return self.mlp(hidden), residual  # partial


class LlamaModel(nn.Module):
    def __init__(self, spec: ModelSpec, layer_cls: type[nn.Module] = LlamaDecoderLayer, tp: TPGroup = SINGLE_RANK):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, tp=tp)
        self.layers = nn.ModuleList([layer_cls(spec, tp) for _ in range(spec.num_layers)])
        self.norm = RMSNorm(spec.hidden_size, eps=spec.rms_norm_eps, tp=tp)
        self.output_is_partial = self.layers[0].output_is_partial  # whether the final norm reduces

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn: AttentionMetadata,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.forward_layers(input_ids, positions, kv_caches, attn, 0, len(self.layers), None, inputs_embeds)

    def forward_layers(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn: AttentionMetadata,
        start: int,
        end: int,
        carry: tuple[torch.Tensor, torch.Tensor] | None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Layers ``start:end`` of the forward, for graphs captured in pieces. A range from 0 embeds
        ``input_ids`` first (or starts from ``inputs_embeds`` (T, hidden) when given); any other
        continues from ``carry``, the (hidden, residual) pair the previous range returned (under TP,
        hidden is this rank's partial sum when the layers' ``output_is_partial``: only the next norm
        reduces it). The range that ends at the last layer returns the normed, reduced hidden states
        (T, hidden); the others return (hidden, residual)."""
        if start == 0:  # (T, hidden), reduced
            hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
            residual = None
        else:
            hidden, residual = carry
        for layer, kv_cache in zip(self.layers[start:end], kv_caches[start:end], strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, attn)
        if end < len(self.layers):
            return hidden, residual
        hidden, _ = self.norm(hidden, residual, partial=self.output_is_partial)
        return hidden


class LlamaForCausalLM(CausalLM):
    """``CausalLM`` over Llama-shaped decoder layers (``layer_cls``; GLM's in glm4.py)."""

    layer_cls: type[nn.Module] = LlamaDecoderLayer
    # HF checkpoint name -> (our fused parameter name, shard id)
    packed_modules_mapping: ClassVar[dict[str, tuple[str, str | int]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    # checkpoint tensors that are not parameters here (RoPE buffers saved by old checkpoints)
    ignored_suffixes = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")

    def __init__(self, spec: ModelSpec, tp: TPGroup = SINGLE_RANK):
        super().__init__(spec, tp)
        self.model = LlamaModel(spec, self.layer_cls, tp)
        tie_to = self.model.embed_tokens if spec.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(spec.vocab_size, spec.hidden_size, tie_to=tie_to, tp=tp)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn: AttentionMetadata,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, positions (T,); one KV cache per layer -> hidden states (T, hidden).
        ``inputs_embeds`` (T, hidden) replaces the embedding of ``input_ids`` when given."""
        return self.model(input_ids, positions, kv_caches, attn, inputs_embeds)

    @property
    def num_layers(self) -> int:
        return len(self.model.layers)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(T,) -> (T, hidden): the token embedding (all-reduced under TP), as forward's first step."""
        return self.model.embed_tokens(input_ids)

    def forward_layers(self, input_ids, positions, kv_caches, attn, start: int, end: int, carry, inputs_embeds=None):
        """See ``LlamaModel.forward_layers``: the forward in pieces (CUDA graphs capture each piece)."""
        return self.model.forward_layers(input_ids, positions, kv_caches, attn, start, end, carry, inputs_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """(N, hidden) -> (N, vocab) float32 on rank 0 (the sampling rank); None on the other ranks."""
        logits = self.lm_head(hidden)
        return None if logits is None else logits.float()

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N,) int64 argmax of the logits, on every rank (``ParallelLMHead.greedy``)."""
        return self.lm_head.greedy(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Fill every parameter from HF-named tensors; raise on unknown or missing names."""
        load_weights(self, weights)

    def parameter_for(self, checkpoint_name: str) -> tuple[str, object]:
        """See ``CausalLM.parameter_for``: HF names through ``packed_modules_mapping``."""
        return _route(self, checkpoint_name)

    def norm_fed_linears(self) -> Iterable[tuple[nn.Module, nn.Module]]:
        """See ``CausalLM.norm_fed_linears``: each layer's two pre-norms (GLM's layers too)."""
        for layer in self.model.layers:
            yield layer.input_layernorm, layer.self_attn.qkv_proj
            yield layer.post_attention_layernorm, layer.mlp.gate_up_proj


def _route(model: nn.Module, name: str) -> tuple[str, object]:
    """HF checkpoint name -> (our parameter name, shard id or None)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in model.packed_modules_mapping:
            fused, shard_id = model.packed_modules_mapping[part]
            return ".".join(parts[:i] + [fused] + parts[i + 1 :]), shard_id
    return name, None


def load_weights(model: CausalLM, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Shared loader for every decoder here: routes HF names (``model.parameter_for``) to each
    parameter's ``weight_loader`` and checks that every parameter (every shard) was filled."""
    params = dict(model.named_parameters())  # a tied lm_head shares the embedding's Parameter: listed once
    tied = model.spec.tie_word_embeddings
    required = {name: set(getattr(_layer_of(p), "shard_ids", (None,))) for name, p in params.items()}
    loaded: dict[str, set] = {name: set() for name in params}
    for ckpt_name, tensor in weights:
        name, shard_id = model.parameter_for(ckpt_name)
        if name.endswith(model.ignored_suffixes) or (tied and name == "lm_head.weight"):
            continue
        if name not in params:
            raise ValueError(f"checkpoint tensor {ckpt_name!r} has no parameter in {type(model).__name__}")
        params[name].weight_loader(params[name], tensor, shard_id)
        loaded[name] |= required[name] if shard_id is None else {shard_id}
    missing = sorted(name for name in params if loaded[name] != required[name])
    if missing:
        shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise ValueError(f"checkpoint is missing weights for {type(model).__name__}: {shown}")


def _layer_of(param: nn.Parameter) -> object:
    """The layer whose bound ``weight_loader`` fills ``param`` (None for plain functions)."""
    return getattr(param.weight_loader, "__self__", None)
