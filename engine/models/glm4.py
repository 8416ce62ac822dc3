"""GLM decoders: ``Glm4ForCausalLM`` (GLM-4-0414 family) and ``GlmForCausalLM`` (GLM-4-9B-chat-hf).

Both are Llama-shaped and reuse its attention and MLP with three differences (``ModelSpec`` fields,
set for these architectures in spec.py):
- RoPE is interleaved (pairs ``2i, 2i+1``) and partial: it turns only the first
  ``head_dim * partial_rotary_factor`` features of each head (HF: ``cos[..., :d/2].repeat_interleave(2)``
  with ``rotate_half`` over even/odd features);
- q/k/v carry a bias when ``attention_bias`` (o_proj never does);
- the checkpoint already stores the MLP as one fused ``gate_up_proj``.
GLM-4 adds two more RMSNorms per layer (a "sandwich"): ``post_self_attn_layernorm`` on the attention
output and ``post_mlp_layernorm`` on the MLP output, each before its residual add. The older GLM has
only the usual two; that is the spec's ``sandwich_norms``.

Under tensor parallelism the sandwich norms are where the attention and MLP partial sums get
reduced (see llama.py), so a GLM-4 layer's output is already reduced (``output_is_partial`` False)
and the next input_layernorm only adds and normalises; the older GLM layer is like Llama's.
"""

from __future__ import annotations

import torch
from torch import nn

from pagoda.engine.attention_metadata import AttentionMetadata
from pagoda.engine.distributed import SINGLE_RANK, TPGroup
from pagoda.engine.layers.layernorm import RMSNorm
from pagoda.engine.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP
from pagoda.engine.models.spec import ModelSpec


class GlmDecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, tp: TPGroup = SINGLE_RANK):
        super().__init__()
        hidden_size, eps = spec.hidden_size, spec.rms_norm_eps
        self.sandwich_norms = spec.sandwich_norms
        # GLM-4: post_mlp_layernorm reduced the MLP's partial sum; the older GLM returns it partial, as Llama.
        self.output_is_partial = not spec.sandwich_norms
        self.self_attn = LlamaAttention(spec, tp)
        self.mlp = LlamaMLP(hidden_size, spec.intermediate_size, spec.mlp_bias, tp=tp)
        self.input_layernorm = RMSNorm(hidden_size, eps=eps, tp=tp)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps=eps, tp=tp)
        if self.sandwich_norms:
            self.post_self_attn_layernorm = RMSNorm(hidden_size, eps=eps, tp=tp)
            self.post_mlp_layernorm = RMSNorm(hidden_size, eps=eps, tp=tp)

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
        if self.sandwich_norms:
            hidden = self.post_self_attn_layernorm(hidden, partial=True)  # reduced from here on
        hidden, residual = self.post_attention_layernorm(hidden, residual, partial=not self.sandwich_norms)
        hidden = self.mlp(hidden)  # partial
        if self.sandwich_norms:
            hidden = self.post_mlp_layernorm(hidden, partial=True)
        return hidden, residual


class GlmForCausalLM(LlamaForCausalLM):
    """``Glm4ForCausalLM`` and ``GlmForCausalLM`` both: the spec's ``sandwich_norms`` tells them apart."""

    layer_cls = GlmDecoderLayer
